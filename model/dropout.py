"""Dropout with a cheap random mask on the CPU (model/blocks.py applies it to attention weights too).

torch's CPU dropout draws one random double per element, one element at a time (bernoulli_): for the baby GPT that
costs more than the rest of a training step. Here a mask reads 16 random bits per element, drawn as whole 64-bit
words, seen as four int16 each: an element is dropped where its int16 falls below a threshold. The drop probability
is p rounded to a multiple of 2**-16 (at most 8e-6 away), and survivors are scaled by 1 / (1 - that probability), so
the output's expectation equals the input, as with nn.Dropout. The bits come from torch's default generator, which
torch.manual_seed seeds, as it seeds nn.Dropout.

Other devices keep torch's own dropout and fused attention: CUDA draws its masks in parallel, inside the kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LEVELS = 1 << 16  # one int16's values


def drop_levels(p: float) -> int:
    """How many of the 2**16 int16 values drop an element: p rounded to a multiple of 2**-16, below 1."""
    return min(LEVELS - 1, round(p * LEVELS))


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """0 where an element is dropped (probability p), 1 / (1 - p) where it is kept.

    p must drop at least one level (dropout() returns its input otherwise): keep - 1 below must fit an int16.
    """
    drop = drop_levels(p)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # all 64 bits random
    bits = words.view(torch.int16)[:n].view(shape)
    # an element is kept where its int16 is >= -32768 + drop: 2**16 - drop of the 2**16 equally likely values.
    # Spelled as arithmetic on the int16s in place (clamp to {keep - 1, keep}, shift to {0, 1}), then one scaling
    # that writes the floats: on the CPU that is several times faster than a comparison, whose bool kernels are
    # not vectorised, and the int16 passes move half the bytes of float ones.
    keep = -32768 + drop
    scale = torch.tensor(LEVELS / (LEVELS - drop), dtype=dtype)  # int16 * a scalar of dtype: a tensor of dtype
    return torch.mul(bits.clamp_(keep - 1, keep).sub_(keep - 1), scale)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or drop_levels(p) == 0:  # p below half a level drops nothing
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x * keep_mask(x.shape, p, x.dtype)


class Dropout(nn.Module):
    """nn.Dropout's behaviour (train mode only, expectation kept), with the CPU mask above."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
