"""The network: shapes, initial loss, causality, weight tying, generation."""
from __future__ import annotations

import math

import pytest
import torch

from model.config import ConfigError, GPTConfig
from model.gpt import GPT


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"vocab_size": 40, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16,
                            **overrides})).eval()


def test_initial_loss_is_uniform_over_the_vocabulary():
    model = tiny_gpt()
    idx = torch.randint(40, (8, 16))
    logits, loss = model(idx, torch.randint(40, (8, 16)))
    assert logits.shape == (8, 16, 40)
    assert loss.item() == pytest.approx(math.log(40), abs=0.1)


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = tiny_gpt()
    idx = torch.randint(40, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 40
    before, _ = model(idx)
    after, _ = model(changed)
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_head_is_tied_to_the_token_embedding_and_counted_once():
    model = tiny_gpt()
    assert model.lm_head.weight is model.wte.weight
    c = model.config
    per_block = 4 * c.n_embd * c.n_embd + 8 * c.n_embd * c.n_embd + 2 * c.n_embd
    expected = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * per_block + c.n_embd
    assert model.num_params() == expected


def test_residual_projections_start_smaller():
    model = GPT(GPTConfig(vocab_size=40, n_layer=8, n_embd=128, n_head=4))
    assert model.blocks[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert model.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_generate_crops_context_and_stays_in_vocabulary():
    model = tiny_gpt()
    idx = torch.randint(40, (2, 5))
    out = model.generate(idx, max_new_tokens=30, temperature=1.0, top_k=10)  # beyond block_size 16
    assert out.shape == (2, 35)
    assert torch.equal(out[:, :5], idx)
    assert out.min() >= 0 and out.max() < 40


def test_top_k_one_equals_greedy():
    model = tiny_gpt()
    idx = torch.randint(40, (1, 4))
    assert torch.equal(model.generate(idx, 12, temperature=0.9, top_k=1), model.generate(idx, 12, temperature=0))


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("overrides, message", [
    ({"n_embd": 30, "n_head": 4}, "divisible"),
    ({"n_layer": 0}, "n_layer must be positive"),
    ({"dropout": 1.0}, "dropout must be in"),
])
def test_impossible_shapes_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(vocab_size=40, **overrides)
