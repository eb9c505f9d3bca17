"""The study's Optuna parts: storage (embedded journal file or an RDB URL), sampler and pruner."""
from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from study.tracking import redact

DEFAULT_JOURNAL = "optuna.journal"
SAMPLERS = ("tpe", "random", "gp", "cmaes")
PRUNERS = ("hyperband", "median", "none")


class StorageError(ValueError):
    """A storage that cannot be opened; the message names it (password redacted)."""


def check_storage_arg(url: str | None) -> None:
    """Refuse what can be refused without touching the store, so a bad argument creates nothing."""
    if url is None or "://" in url:
        if url and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).parent.is_dir():
            raise StorageError(f"--storage {url}: directory {Path(url.removeprefix('sqlite:///')).parent} does not exist")
        return
    if not Path(url).parent.is_dir():
        raise StorageError(f"--storage {url}: directory {Path(url).parent} does not exist")


def make_storage(url: str | None) -> BaseStorage:
    """None: a journal file in the working directory. A URL (sqlite:///, postgresql://): an RDB. Else a journal path."""
    if url is None or "://" not in url:
        path = Path(url or DEFAULT_JOURNAL)
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise StorageError(f"--storage {path}: cannot open journal file ({exc.strerror})") from None
    try:
        return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except ImportError as exc:
        raise StorageError(f"--storage {redact(url)}: database driver missing ({exc})") from None
    except Exception as exc:  # sqlalchemy's connection and URL errors have no common base worth naming
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"--storage {redact(url)}: cannot connect ({redact(reason)[:300]})") from None


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)  # multivariate with constant liar: Optuna's defaults
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        # CMA-ES handles the numeric parameters; the categorical ones fall back to random sampling
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {name!r}")


def make_pruner(name: str, eval_interval: int, max_iters: int) -> optuna.pruners.BasePruner:
    """Pruners count resource in training steps: one report per eval, at the step number."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_interval, max_resource=max_iters, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=eval_interval)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}")
