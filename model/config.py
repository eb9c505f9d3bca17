"""Configuration: the network (GPTConfig) and the training run (TrainConfig), validated on creation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
ARCHS = ("gpt", "encoder-decoder")  # model/tasks.py: what each trains on


class ConfigError(ValueError):
    """An impossible configuration; the message names the field and the problem."""


def _positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(obj, name)}")


def _check_heads_and_dropout(obj) -> None:
    if obj.n_embd % obj.n_head != 0:
        raise ConfigError(f"n_embd ({obj.n_embd}) must be divisible by n_head ({obj.n_head})")
    if not 0.0 <= obj.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {obj.dropout}")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the network. vocab_size comes from the corpus."""

    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        _check_heads_and_dropout(self)


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the network's shape plus the optimisation schedule.

    Defaults are nanoGPT's CPU recipe for Tiny Shakespeare (the "baby" GPT). Field names are the
    hyperparameter names used everywhere else: CLI flags, Optuna params, MLflow params, report columns.
    """

    n_layer: int = _f(4, "transformer blocks")
    n_head: int = _f(4, "attention heads per block")
    n_embd: int = _f(128, "embedding width")
    block_size: int = _f(64, "context length in characters")
    dropout: float = _f(0.0, "dropout probability in [0, 1)")
    bias: bool = _f(False, "biases in Linear and LayerNorm layers")
    batch_size: int = _f(12, "sequences per step")
    max_iters: int = _f(2000, "optimizer steps")
    learning_rate: float = _f(1e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of learning_rate")
    warmup_iters: int = _f(100, "linear warm-up steps")
    weight_decay: float = _f(0.1, "AdamW weight decay on matrices")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.99, "AdamW beta2")
    grad_clip: float = _f(1.0, "gradient-norm clip (0 disables)")
    eval_interval: int = _f(250, "steps between loss estimates")
    eval_iters: int = _f(20, "batches per loss estimate")
    seed: int = _f(1337, "random seed (weights, batches, dropout)")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: bool | None = _f(None, "torch.compile the model (default: on for CUDA)")
    precision: str = _f("auto", "matmuls in fp32, or bf16 under autocast (auto: bf16 on CUDA and on CPUs with native "
                               "bf16 instructions, fp32 elsewhere)")
    arch: str = _f("gpt", "gpt (next character of the corpus) or encoder-decoder (next line of each line)")

    def __post_init__(self) -> None:
        _positive(self, "block_size", "n_layer", "n_head", "n_embd", "batch_size", "max_iters",
                  "learning_rate", "eval_interval", "eval_iters")
        _check_heads_and_dropout(self)
        if self.warmup_iters < 0:
            raise ConfigError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        kind, _, index = self.device.partition(":")
        if kind not in DEVICES or (":" in self.device and (kind != "cuda" or not index.isdigit())):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}")

    @property
    def min_lr(self) -> float:
        return self.learning_rate * self.min_lr_ratio

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias)

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed (validated); unknown names raise ConfigError."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


# nanoGPT's Tiny Shakespeare configurations: `--config NAME` of model.train and model.bench, and the baselines
# of the study's presets.
NAMED = {
    "baby": TrainConfig(),  # the CPU recipe: the defaults
    "shakespeare-char": TrainConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2,
                                    max_iters=5000, eval_iters=200),
}
