"""The Transformer's parts, one home for both model families: attention (self and cross, with its masks), MLP, blocks.

The GPT stacks causal `Block`s. The encoder-decoder stacks `Block(causal=False)` over the padded source and
`DecoderBlock`s (causal self-attention, then cross-attention to the encoder's output) over the target.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig
from model.dropout import Dropout, dropout


def padding_bias(pad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) True at padding -> (B, 1, 1, S): -inf at padded keys, 0 elsewhere, broadcast over heads and queries."""
    return torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill_(pad, float("-inf"))[:, None, None, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, training: bool, causal: bool = False,
              key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + mask) v, dropout p on the weights. q is (B, nh, T, hs); k, v are (B, nh, S, hs).

    causal: query t weighs keys <= t (self-attention, S == T). key_bias (B, 1, 1, S): padded keys get no weight.
    One mask or the other: a decoder's right-padding lies in every real position's future, so causal suffices.
    """
    if causal and key_bias is not None:
        raise ValueError("attention takes a causal mask or a padding mask, not both")
    dropping = training and p > 0.0
    if q.device.type != "cpu" or not (dropping or q.dtype == torch.bfloat16):  # fused kernels (flash on CUDA)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias, dropout_p=p if dropping else 0.0,
                                              is_causal=causal)
    # On the CPU a fused kernel with dropout draws its mask with bernoulli_; spelled out, the mask is cheap. In bf16
    # the spelled-out matmuls are also faster than the fused kernel (docs/benchmarks.md: 1.4x a baby GPT's step).
    B, nh, T, hs = q.shape
    S = k.size(2)
    if causal:
        bias = _future_bias(T, q.dtype, q.device)  # (T, T): -inf above the diagonal, so row t weighs keys <= t
    elif key_bias is not None:
        bias = key_bias.expand(B, nh, 1, S).reshape(B * nh, 1, S)  # every query row of a sequence: same padding
    else:
        bias = q.new_zeros(())
    # scores, scaled and masked in one matmul
    att = torch.baddbmm(bias, q.reshape(B * nh, T, hs), k.reshape(B * nh, S, hs).transpose(1, 2),
                        alpha=1.0 / math.sqrt(hs))  # (B * nh, T, S)
    att = F.softmax(att, dim=-1).view(B, nh, T, S)
    return dropout(att, p, training) @ v  # (B, nh, T, hs)


@functools.lru_cache(maxsize=16)
def _future_bias(T: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(T, T): 0 on and below the diagonal, -inf above it."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(1)


def _heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = t.shape
    return t.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hs)


def _merge(y: torch.Tensor) -> torch.Tensor:
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, nh, T, hs) -> (B, T, C)


class SelfAttention(nn.Module):
    """Each position attends to the sequence's positions: earlier ones only when causal, unpadded ones all."""

    def __init__(self, config: GPTConfig, causal: bool = True):
        super().__init__()
        self.n_head, self.dropout, self.causal = config.n_head, config.dropout, causal
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (_heads(t, self.n_head) for t in self.c_attn(x).split(x.size(-1), dim=2))
        y = attention(q, k, v, self.dropout, self.training, self.causal, key_bias)  # (B, nh, T, hs)
        return self.resid_dropout(self.c_proj(_merge(y)))


class CrossAttention(nn.Module):
    """Each target position attends to every unpadded position of the encoded source (the memory)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)  # k, v of the memory
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_bias: torch.Tensor | None) -> torch.Tensor:
        q = _heads(self.c_q(x), self.n_head)  # (B, nh, T, hs)
        k, v = (_heads(t, self.n_head) for t in self.c_kv(memory).split(memory.size(-1), dim=2))  # (B, nh, S, hs)
        y = attention(q, k, v, self.dropout, self.training, key_bias=memory_bias)
        return self.resid_dropout(self.c_proj(_merge(y)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm: each sublayer reads a normalised copy and adds its output to the residual stream.

    causal: the GPT's block. Not causal: the encoder's, whose key_bias hides the source's padding.
    """

    def __init__(self, config: GPTConfig, causal: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config, causal)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), key_bias)
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(nn.Module):
    """The GPT's block with cross-attention between its two sublayers: read the target so far, then the source."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config, causal=True)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.cross = CrossAttention(config)
        self.ln_3 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.cross(self.ln_2(x), memory, memory_bias)
        return x + self.mlp(self.ln_3(x))


def init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2's initialisation, with residual projections scaled so the stream's variance does not grow with depth."""
    model.apply(_init_module)  # children before parents: the order the random draws are made in
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


def _init_module(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (Linear and embedding weights); leave biases and LayerNorm gains alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
    """(B, vocab) logits -> (B, 1) next ids: the most likely at temperature 0, else sampled among the top_k."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
