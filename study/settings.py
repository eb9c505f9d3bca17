"""A study's settings: one validated object, built once from the command line or the Python API.

The process that creates the study's stores and every worker it starts read the same object: a worker never
re-parses flags, so what was checked is what runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import ConfigError, TrainConfig
from model.data import Corpus, DataError, load_corpus
from model.sample import SampleSpec
from model.tasks import make_task
from model.train import resolve_device
from study.errors import redact
from study.options import OBJECTIVES, StudyOptions
from study.space import PRESETS, check_space, load_space_file, values_of
from study.storage import DEFAULT_JOURNAL, check_storage_arg
from study.tracking import check_tracking, resolve_tracking_uri

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
    ray_address: str | None = None  # trials as Ray tasks on this cluster
    trials_per_gpu: int | None = None
    deadline: float | None = None  # time.time() at which --timeout ends the study: set when its trials start
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


def settings_from_options(options: StudyOptions) -> tuple[StudySettings, Corpus]:
    """Check everything that can be checked before any store is touched; returns the settings and the corpus."""
    preset = PRESETS[options.preset]
    base = preset.baseline.replace(**{**options.config, "seed": options.seed})
    if not options.ray_address:  # on a cluster, each node resolves it
        resolve_device(base.device)  # a device this machine lacks fails here, not in every trial
    space = load_space_file(options.space, preset) if options.space else dict(preset.space)
    check_space(space, base)
    corpus = load_corpus(options.data)
    blocks = values_of(space["block_size"]) or [space["block_size"].high]
    for block in {min(blocks), max(blocks)}:  # the corpus serves the longest block; the task takes the shortest
        make_task(corpus, base.replace(block_size=block))
    prompt = options.sample_prompt
    if prompt is None:
        prompt = "ROMEO:" if not corpus.tokenizer.unknown("ROMEO:") else corpus.tokenizer.decode(corpus.train[:8])
    if not prompt or corpus.tokenizer.unknown(prompt):
        raise DataError(f"--sample-prompt has characters outside the corpus vocabulary: "
                        f"{' '.join(map(repr, corpus.tokenizer.unknown(prompt))) or '(empty prompt)'}")
    suffix = ("" if base.arch == "gpt" else f"-{base.arch}") + \
        ("-loss-time" if options.objective == "loss-time" else "")
    check_storage_arg(options.storage)
    storage = options.storage
    if options.ray_address:  # tasks run in their own directories: a file store is named whole
        storage = absolute_store(storage)
    tracking_uri = resolve_tracking_uri(options.tracking_uri)
    check_tracking(tracking_uri)
    settings = StudySettings(
        study_name=options.study_name or f"{preset.name}-{corpus.name}{suffix}", preset=preset.name, space=space,
        base=base, data_path=str(corpus.path), corpus_sha256=corpus.sha256,
        sample=SampleSpec(prompt, options.sample_tokens, seed=options.seed), objective=options.objective,
        sampler=options.sampler, pruner=options.pruner if len(OBJECTIVES[options.objective]) == 1 else "none",
        seed=options.seed, storage=storage, tracking_uri=tracking_uri, trials=options.trials,
        timeout=options.timeout,
        workers=worker_count(options, base, preset.worker_per_core), threads=options.threads,
        ray_address=options.ray_address, trials_per_gpu=options.trials_per_gpu,
        heartbeat_interval=options.heartbeat_interval,
        spool_dir=options.spool_dir, shown={"storage": options.storage, "tracking_uri": options.tracking_uri})
    return settings, corpus


def worker_count(options: StudyOptions, base: TrainConfig, per_core: bool = False) -> int:
    """Worker processes for this run: --workers, or --trials-per-gpu times the GPUs in use (one for --device cuda:N).

    Without either: one, or on the CPU for a preset whose trials are worth a process each (per_core), one per
    usable core (at most MAX_CPU_WORKERS), or per --threads cores: small networks keep one core busy better than two.
    """
    if options.ray_address:  # --workers caps the trials at once; else the cluster's resources decide
        return options.workers or 0
    if options.trials_per_gpu:
        device = resolve_device(base.device)
        if device.type != "cuda":
            raise ConfigError(f"--trials-per-gpu needs CUDA, but trials train on {device.type}: use --workers")
        return options.trials_per_gpu * (1 if device.index is not None else torch.cuda.device_count())
    if options.workers:
        return options.workers
    if not per_core or resolve_device(base.device).type != "cpu":
        return 1
    return max(1, min(MAX_CPU_WORKERS, usable_cores() // (options.threads or 1)))


def usable_cores() -> int:
    """The cores this process may run on (taskset, cgroups' cpusets), or all of them where the OS cannot say."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def absolute_store(url: str | None) -> str:
    """A journal path or sqlite URL made absolute; a server's URL as it is."""
    if url is not None and "://" in url and not url.startswith("sqlite:///"):
        return url
    if url is not None and url.startswith("sqlite:///"):
        return f"sqlite:///{Path(url.removeprefix('sqlite:///')).resolve()}"
    return str(Path(url or DEFAULT_JOURNAL).resolve())
