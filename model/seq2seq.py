"""The encoder-decoder Transformer over characters: the encoder reads a whole source line, the decoder writes the
next line one character at a time, attending causally to what it wrote and, through cross-attention, to the source.

Built from the GPT's parts (model/blocks.py), pre-LayerNorm like it. The vocabulary is the corpus's characters
followed by three specials (ids in that order): padding, begin and end of a target line.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.blocks import Block, DecoderBlock, decay_groups, init_weights, padding_bias, pick_next
from model.config import GPTConfig
from model.dropout import Dropout

SPECIALS = ("<pad>", "<bos>", "<eos>")  # after the corpus's characters


def special_ids(vocab_size: int) -> tuple[int, int, int]:
    """(pad, bos, eos) ids of a vocabulary of vocab_size ids, specials included."""
    pad = vocab_size - len(SPECIALS)
    return pad, pad + 1, pad + 2


class EncoderDecoder(nn.Module):
    """config.vocab_size counts the specials; config.block_size bounds source and target lengths alike."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.pad_id, self.bos_id, self.eos_id = special_ids(config.vocab_size)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # one table for source, target and output
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(config, causal=False) for _ in range(config.n_layer))
        self.ln_enc = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.decoder = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

        init_weights(self, config.n_layer)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        return self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))  # (B, T, C)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S), right-padded with pad_id -> the memory (B, S, C) and its padding bias (B, 1, 1, S)."""
        bias = padding_bias(src == self.pad_id, self.wte.weight.dtype)
        x = self._embed(src)
        for block in self.encoder:
            x = block(x, bias)  # every source position sees every unpadded one, before and after it
        return self.ln_enc(x), bias

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, memory_bias: torch.Tensor) -> torch.Tensor:
        """tgt (B, T): <bos> and the target so far -> logits (B, T, vocab) for each next character."""
        x = self._embed(tgt)
        for block in self.decoder:
            x = block(x, memory, memory_bias)
        return self.lm_head(self.ln_f(x))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, targets: torch.Tensor | None = None):
        """targets (B, T): tgt shifted by one, ending in <eos>, padded with pad_id, which the loss leaves out."""
        logits = self.decode(tgt, *self.encode(src))
        loss = None
        if targets is not None:  # mean over target characters (<eos> included), padding excluded
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=self.pad_id)
        return logits, loss

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        return decay_groups(self, weight_decay)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_new_tokens: int | None = None, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 never: Sequence[int] = ()) -> list[list[int]]:
        """Each source's next line as character ids, <eos> and what follows it left out; temperature 0 is greedy.

        never: ids not to write (a line's newline, which no target holds but the vocabulary does).
        """
        banned = [self.pad_id, self.bos_id, *never]
        limit = self.config.block_size  # <eos> included: a target's length
        max_new_tokens = limit if max_new_tokens is None else min(max_new_tokens, limit)
        memory, bias = self.encode(src)
        out = torch.full((src.size(0), 1), self.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        for _ in range(max_new_tokens):
            logits = self.decode(out, memory, bias)[:, -1, :].float()
            logits[:, banned] = float("-inf")  # never written by a target
            next_id = pick_next(logits, temperature, top_k, generator)
            out = torch.cat((out, next_id), dim=1)
            done |= next_id.squeeze(1) == self.eos_id
            if bool(done.all()):
                break
        lines = []
        for row in out[:, 1:].tolist():
            lines.append(row[:row.index(self.eos_id)] if self.eos_id in row else row)
        return lines
