"""A study's settings: one validated object, built once from the command line or the Python API.

The process that creates the study's stores and every worker it starts read the same object: a worker never
re-parses flags, so what was checked is what runs.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import torch

from model.cli import config_overrides
from model.config import ConfigError, TrainConfig
from model.data import Corpus, DataError, load_corpus
from model.tasks import make_task
from model.train import resolve_device
from study.objective import OBJECTIVES, SampleSpec
from study.space import PRESETS, check_space, load_space_file, values_of
from study.storage import DEFAULT_JOURNAL, check_storage_arg
from study.tracking import check_tracking, redact, resolve_tracking_uri

# More workers than this and a 50-trial study's sampler sees too few finished trials when it proposes the next.
MAX_CPU_WORKERS = 8


@dataclass(frozen=True)
class StudySettings:
    study_name: str
    preset: str
    space: dict  # name -> optuna distribution
    base: TrainConfig  # the preset's baseline with the fixed flags and --seed applied
    data_path: str
    corpus_sha256: str
    sample: SampleSpec
    objective: str
    sampler: str
    pruner: str  # what runs: "none" for a multi-objective study whatever was asked
    seed: int
    storage: str | None  # None: ./optuna.journal
    tracking_uri: str
    trials: int
    timeout: float | None = None
    workers: int = 1
    threads: int | None = None
    heartbeat_interval: int | None = 60
    spool_dir: str | None = None  # None: ./mlflow-spool
    # what the user typed for the stores, for the commands printed at the end (None where a default applied)
    shown: dict = field(default_factory=dict)

    @property
    def storage_label(self) -> str:
        return redact(self.storage or DEFAULT_JOURNAL)

    def load_corpus(self) -> Corpus:
        """The corpus the settings were checked against; a file changed since then is refused."""
        corpus = load_corpus(self.data_path)
        if corpus.sha256 != self.corpus_sha256:
            raise DataError(f"--data {self.data_path}: the file changed since the study started")
        return corpus


def settings_from_args(args: argparse.Namespace) -> tuple[StudySettings, Corpus]:
    """Check everything that can be checked before any store is touched; returns the settings and the corpus."""
    preset = PRESETS[args.preset]
    base = preset.baseline.replace(**{**config_overrides(args), "seed": args.seed})
    resolve_device(base.device)  # a device this machine lacks fails here, not in every trial
    space = load_space_file(args.space, preset) if args.space else dict(preset.space)
    check_space(space, base)
    corpus = load_corpus(args.data)
    blocks = values_of(space["block_size"]) or [space["block_size"].high]
    for block in {min(blocks), max(blocks)}:  # the corpus serves the longest block; the task takes the shortest
        make_task(corpus, base.replace(block_size=block))
    prompt = args.sample_prompt
    if prompt is None:
        prompt = "ROMEO:" if not corpus.tokenizer.unknown("ROMEO:") else corpus.tokenizer.decode(corpus.train[:8])
    if not prompt or corpus.tokenizer.unknown(prompt):
        raise DataError(f"--sample-prompt has characters outside the corpus vocabulary: "
                        f"{' '.join(map(repr, corpus.tokenizer.unknown(prompt))) or '(empty prompt)'}")
    suffix = ("" if base.arch == "gpt" else f"-{base.arch}") + ("-loss-time" if args.objective == "loss-time" else "")
    check_storage_arg(args.storage)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(tracking_uri)
    settings = StudySettings(
        study_name=args.study_name or f"{preset.name}-{corpus.name}{suffix}", preset=preset.name, space=space,
        base=base, data_path=str(corpus.path), corpus_sha256=corpus.sha256,
        sample=SampleSpec(prompt, args.sample_tokens, seed=args.seed), objective=args.objective,
        sampler=args.sampler, pruner=args.pruner if len(OBJECTIVES[args.objective]) == 1 else "none",
        seed=args.seed, storage=args.storage, tracking_uri=tracking_uri, trials=args.trials, timeout=args.timeout,
        workers=worker_count(args, base, preset.worker_per_core), threads=args.threads,
        heartbeat_interval=args.heartbeat_interval,
        spool_dir=args.spool_dir, shown={"storage": args.storage, "tracking_uri": args.tracking_uri})
    return settings, corpus


def worker_count(args: argparse.Namespace, base: TrainConfig, per_core: bool = False) -> int:
    """Worker processes for this run: --workers, or --trials-per-gpu times the GPUs in use (one for --device cuda:N).

    Without either: one, or on the CPU for a preset whose trials are worth a process each (per_core), one per
    usable core (at most MAX_CPU_WORKERS), or per --threads cores: small networks keep one core busy better than two.
    """
    if args.trials_per_gpu:
        device = resolve_device(base.device)
        if device.type != "cuda":
            raise ConfigError(f"--trials-per-gpu needs CUDA, but trials train on {device.type}: use --workers")
        return args.trials_per_gpu * (1 if device.index is not None else torch.cuda.device_count())
    if args.workers:
        return args.workers
    if not per_core or resolve_device(base.device).type != "cpu":
        return 1
    return max(1, min(MAX_CPU_WORKERS, usable_cores() // (args.threads or 1)))


def usable_cores() -> int:
    """The cores this process may run on (taskset, cgroups' cpusets), or all of them where the OS cannot say."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    return len(affinity(0)) if affinity else os.cpu_count() or 1
