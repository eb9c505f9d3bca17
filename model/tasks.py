"""What a run trains on, by architecture: the GPT reads windows of the corpus and predicts each next character;
the encoder-decoder reads a line and writes the next one (model/lines.py). train() asks a task for its network and
its batches, and knows no more of either."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from model.config import TrainConfig
from model.data import Corpus, DataError, get_batch
from model.gpt import GPT
from model.lines import line_pairs, pair_rows
from model.seq2seq import SPECIALS, EncoderDecoder, special_ids

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # the network's inputs, the targets


class Task:
    """A task's data, by split ("train", "val"), moved to the device that trains on it."""

    splits: dict

    def to(self, device: torch.device) -> Task:
        self.splits = {k: v.to(device) for k, v in self.splits.items()}
        return self


class Windows(Task):
    """The GPT's task: random windows of block_size characters, each target the window shifted by one."""

    def __init__(self, corpus: Corpus, config: TrainConfig):
        corpus.check_block_size(config.block_size)
        self.corpus, self.block_size, self.batch_size = corpus, config.block_size, config.batch_size
        self.splits = {"train": corpus.train, "val": corpus.val}
        self.vocab_size = corpus.vocab_size

    def model(self, config: TrainConfig) -> nn.Module:
        return GPT(config.model_config(self.vocab_size))

    def batch(self, split: str, generator: torch.Generator) -> Batch:
        x, y = get_batch(self.splits[split], self.block_size, self.batch_size, generator)
        return (x,), y

    def describe(self) -> str:
        c = self.corpus
        return (f"corpus {c.path}: {len(c.train):,} train / {len(c.val):,} val characters, "
                f"vocabulary {c.vocab_size}")


class NextLines(Task):
    """The encoder-decoder's task: random (line, next line) pairs, padded to the longest in each batch."""

    def __init__(self, corpus: Corpus, config: TrainConfig):
        if config.block_size < 2:
            raise DataError(f"block_size {config.block_size}: the next-line task needs at least 2 "
                            f"(<bos> and one character)")
        self.corpus, self.batch_size = corpus, config.batch_size
        self.vocab_size = corpus.vocab_size + len(SPECIALS)
        self.pad_id, _, self.eos_id = special_ids(self.vocab_size)
        newline = corpus.tokenizer.stoi.get("\n")
        self.splits = {split: line_pairs(ids, newline, config.block_size, self.vocab_size, name, str(corpus.path))
                       for split, ids, name in (("train", corpus.train, "training"), ("val", corpus.val, "validation"))}

    def model(self, config: TrainConfig) -> nn.Module:
        return EncoderDecoder(config.model_config(self.vocab_size))

    def batch(self, split: str, generator: torch.Generator) -> Batch:
        pairs = self.splits[split]
        return self.rows(split, torch.randint(len(pairs), (self.batch_size,), device=pairs.src.device,
                                              generator=generator))

    def rows(self, split: str, rows: torch.Tensor) -> Batch:
        """These pairs of the split as a batch."""
        src, tgt, out = pair_rows(self.splits[split], rows)
        return (src, tgt), out

    def describe(self) -> str:
        tr, va = self.splits["train"], self.splits["val"]
        cut_src, cut_tgt = tr.cut_sources + va.cut_sources, tr.cut_targets + va.cut_targets
        return (f"corpus {self.corpus.path}: {len(tr):,} train / {len(va):,} val line pairs, vocabulary "
                f"{self.corpus.vocab_size} + {len(SPECIALS)} specials; cut to block_size: {cut_src:,} sources, "
                f"{cut_tgt:,} targets")


class GPTNextLines(NextLines):
    """The next-line task for a GPT, to compare the two families on it: each pair read as one sequence, source,
    newline, target, newline, and scored on the target's characters and its final newline only (<eos>'s place).
    Its context is 2 * block_size: a source of block_size, the newline, a target of block_size - 1."""

    def __init__(self, corpus: Corpus, config: TrainConfig):
        super().__init__(corpus, config)  # refuses a corpus of fewer than two lines: it has a newline
        self.vocab_size, self.newline = corpus.vocab_size, corpus.tokenizer.stoi["\n"]

    def model(self, config: TrainConfig) -> nn.Module:
        return GPT(dataclasses.replace(config.model_config(self.vocab_size), block_size=2 * config.block_size))

    def rows(self, split: str, rows: torch.Tensor) -> Batch:
        (src, _), out = super().rows(split, rows)
        rows, targets = [], []
        for s, o in zip(src, out):
            s, o = s[s != self.pad_id], o[o != self.pad_id]
            o = torch.where(o == self.eos_id, self.newline, o)  # the target's end: a newline, as in the text
            seq = torch.cat([s, s.new_tensor([self.newline]), o])
            rows.append(seq[:-1])
            targets.append(torch.cat([o.new_full((len(s),), -100), o]))  # -100: cross_entropy leaves it out
        x = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.newline)
        y = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=-100)
        return (x,), y


TASKS = {"gpt": Windows, "encoder-decoder": NextLines}
MODELS = {"gpt": GPT, "encoder-decoder": EncoderDecoder}


def count_params(config: TrainConfig, corpus_vocab_size: int) -> int:
    """Parameters of config's network for a corpus of this many characters, without allocating its weights."""
    vocab = corpus_vocab_size + (len(SPECIALS) if config.arch == "encoder-decoder" else 0)
    with torch.device("meta"):
        return MODELS[config.arch](config.model_config(vocab)).num_params()


def make_task(corpus: Corpus, config: TrainConfig) -> Task:
    """The task config.arch trains on; raises DataError if the corpus cannot serve it."""
    return TASKS[config.arch](corpus, config)
