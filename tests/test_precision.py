"""bf16 autocast on the CPU: the spelled-out attention it takes, and training to fp32's losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from model.blocks import attention
from model.config import ConfigError
from model.train import train


def test_bf16_attention_on_the_cpu_matches_the_fused_fp32_kernel_and_stays_causal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    half = attention(*(t.bfloat16() for t in (q, k, v)), p=0.0, training=False, causal=True)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), fused, atol=3e-2, rtol=3e-2)  # bf16 keeps 8 bits of mantissa
    changed = v.clone()
    changed[:, :, 10] += 1.0
    later = attention(*(t.bfloat16() for t in (q, k, changed)), p=0.0, training=False, causal=True)
    assert torch.equal(half[:, :, :10], later[:, :, :10])  # a future value never leaks into earlier outputs


def test_bf16_training_reaches_the_losses_of_fp32_and_says_which_ran(corpus):
    config = tiny_config(max_iters=60, eval_interval=20, dropout=0.1)
    fp32 = train(config.replace(precision="fp32"), corpus)
    bf16 = train(config.replace(precision="bf16"), corpus)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert bf16.summary()["precision"] == "bf16"
    for a, b in zip(fp32.history, bf16.history):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=0.05)
    assert bf16.val_loss < bf16.history[0]["val_loss"]  # it learns
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # weights stay fp32: only matmuls drop


def test_an_unknown_precision_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        tiny_config(precision="fp16")
