"""Dropout on the CPU: nn.Dropout's rate, scaling and seeding, in nanoGPT's places, with a cheap mask."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.blocks import attention
from model.config import GPTConfig
from model.dropout import LEVELS, Dropout, drop_levels, dropout
from model.gpt import GPT


@pytest.mark.parametrize("p", [0.0066, 0.1, 0.5])
def test_drops_at_rate_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    n = 1 << 20
    y = dropout(torch.ones(n), p, training=True)
    kept = y != 0
    p_eff = drop_levels(p) / LEVELS
    assert abs(p_eff - p) <= 0.5 / LEVELS
    assert y[kept].unique().tolist() == pytest.approx([1 / (1 - p_eff)])  # survivors scaled as nn.Dropout scales them
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs((1 - kept.float().mean().item()) - p) < 5 * sigma  # binomial: 5 sigma is a 1-in-3.5M fluke
    assert abs(y.mean().item() - 1) < 5 * sigma / (1 - p)


def test_elements_are_dropped_independently():
    torch.manual_seed(0)
    kept = dropout(torch.ones(1 << 20), 0.5, training=True) != 0
    # each int16 is a different quarter of a random word: neighbours must not move together
    pairs = kept.view(-1, 2)
    both = (pairs[:, 0] & pairs[:, 1]).float().mean().item()
    assert both == pytest.approx(0.25, abs=0.005)


def test_the_same_seed_gives_the_same_mask_and_another_seed_another():
    x = torch.randn(64, 128)
    torch.manual_seed(3)
    a = dropout(x, 0.1, training=True)
    torch.manual_seed(3)
    b = dropout(x, 0.1, training=True)
    torch.manual_seed(4)
    c = dropout(x, 0.1, training=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_flows_through_kept_elements_only():
    torch.manual_seed(0)
    x = torch.randn(32, 32, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    y.sum().backward()
    scale = LEVELS / (LEVELS - drop_levels(0.3))
    assert torch.equal(x.grad, torch.where(y != 0, scale, 0.0))


def test_evaluation_mode_and_p_zero_leave_the_input_alone():
    x = torch.randn(8, 8)
    layer = Dropout(0.2).eval()
    assert layer(x) is x
    assert dropout(x, 0.0, training=True) is x


def test_attention_without_drops_equals_the_fused_kernel():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    spelled_out = attention(q, k, v, p=1e-9, training=True, causal=True)  # rounds to no drops, takes the CPU path
    torch.testing.assert_close(spelled_out, fused)


def test_attention_dropout_acts_on_the_weights_and_stays_causal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    changed = v.clone()
    changed[:, :, 10] += 1.0
    torch.manual_seed(5)
    a = attention(q, k, v, p=0.5, training=True, causal=True)
    torch.manual_seed(5)
    b = attention(q, k, changed, p=0.5, training=True, causal=True)
    assert torch.equal(a[:, :, :10], b[:, :, :10])  # a future value never leaks into earlier outputs
    # the first position attends to itself alone: its weight 1 is either dropped or scaled by 1 / (1 - p)
    first = a[:, :, 0] / v[:, :, 0]
    scale = LEVELS / (LEVELS - drop_levels(0.5))
    assert all(r == pytest.approx(0, abs=1e-6) or r == pytest.approx(scale) for r in first.flatten().tolist())


def test_the_gpt_drops_in_training_only_and_reproducibly():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.2))
    idx = torch.randint(40, (4, 16))
    outputs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outputs.append(model(idx)[0])
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    # embeddings, attention weights, attention output and MLP output: nanoGPT's four places
    assert sum(isinstance(m, Dropout) for m in model.modules()) == 1 + 2 * 2
    assert all(block.attn.dropout == 0.2 for block in model.blocks)
