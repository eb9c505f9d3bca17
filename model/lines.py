"""The next-line task's data: each non-empty line of a corpus as the source, the next non-empty line as the target.

Pairs come from the corpus's own split (the first 90% of its characters train, the rest validate), encoded with
its characters plus the encoder-decoder's specials. block_size bounds both sides: a source keeps its first
block_size characters, a target its first block_size - 1 (the decoder reads <bos> before them and is taught to
write <eos> after them); how many lines were cut is counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.data import DataError
from model.seq2seq import special_ids


@dataclass
class LinePairs:
    """One split's pairs, right-padded to block_size: src (N, block), tgt (N, block) <bos> + target, out (N, block)
    target + <eos>; src_len and tgt_len (N,) say where the padding starts."""

    src: torch.Tensor
    tgt: torch.Tensor
    out: torch.Tensor
    src_len: torch.Tensor
    tgt_len: torch.Tensor
    cut_sources: int
    cut_targets: int

    def __len__(self) -> int:
        return self.src.size(0)

    def to(self, device: torch.device | str) -> LinePairs:
        return LinePairs(self.src.to(device), self.tgt.to(device), self.out.to(device), self.src_len.to(device),
                         self.tgt_len.to(device), self.cut_sources, self.cut_targets)


def _lines(ids: torch.Tensor, newline: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, lengths) of the non-empty lines of ids."""
    ends = (ids == newline).nonzero().flatten() if newline is not None else ids.new_empty(0)
    ends = torch.cat([ends, ends.new_tensor([len(ids)])])
    starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
    keep = ends > starts
    return starts[keep], (ends - starts)[keep]


def _padded(ids: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """(n, width): row i holds ids[starts[i]:][:lengths[i]], then pad."""
    at = starts[:, None] + torch.arange(width)
    return torch.where(torch.arange(width) < lengths[:, None], ids[at.clamp(max=len(ids) - 1)], pad)


def line_pairs(ids: torch.Tensor, newline: int | None, block_size: int, vocab_size: int, split: str,
               where: str) -> LinePairs:
    """The (line, next non-empty line) pairs of one split's ids; vocab_size counts the specials."""
    starts, lengths = _lines(ids, newline)
    if len(starts) < 2:
        raise DataError(f"{where}: the {split} split has {len(starts)} non-empty line(s); the next-line task "
                        f"needs at least two")
    pad, bos, eos = special_ids(vocab_size)
    src_len = lengths[:-1].clamp(max=block_size)
    tgt_chars = lengths[1:].clamp(max=block_size - 1)
    src = _padded(ids, starts[:-1], src_len, block_size, pad)
    chars = _padded(ids, starts[1:], tgt_chars, block_size - 1, pad)
    n = len(src)
    tgt = torch.cat([torch.full((n, 1), bos), chars], dim=1)  # <bos> + target
    out = torch.cat([chars, torch.full((n, 1), pad)], dim=1)
    out[torch.arange(n), tgt_chars] = eos  # target + <eos>
    return LinePairs(src, tgt, out, src_len, tgt_chars + 1, int((lengths[:-1] > block_size).sum()),
                     int((lengths[1:] > block_size - 1).sum()))


def pair_rows(pairs: LinePairs, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """These pairs as (src, tgt, out), cut to the longest source and target among them."""
    S, T = int(pairs.src_len[rows].max()), int(pairs.tgt_len[rows].max())
    return pairs.src[rows, :S], pairs.tgt[rows, :T], pairs.out[rows, :T]
