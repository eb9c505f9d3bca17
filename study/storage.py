"""The study's Optuna parts: storage (embedded journal file or an RDB URL), sampler and pruner."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import tempfile
import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from study.tracking import first_line, redact

DEFAULT_JOURNAL = "optuna.journal"
SAMPLERS = ("tpe", "random", "gp", "cmaes")
PRUNERS = ("hyperband", "median", "none")


class StorageError(ValueError):
    """A storage that cannot be opened; the message names it (password redacted)."""


def check_storage_arg(url: str | None) -> None:
    """Refuse what can be refused without touching the store, so a bad argument creates nothing."""
    if url is None or ("://" in url and not url.startswith("sqlite:///")):
        return
    directory = Path(url.removeprefix("sqlite:///")).parent
    if not directory.is_dir():
        raise StorageError(f"--storage {url}: directory {directory} does not exist")


def make_storage(url: str | None, heartbeat_interval: int | None = None, stale_callback=None) -> BaseStorage:
    """None: a journal file in the working directory. A URL (sqlite:///, postgresql://): an RDB. Else a journal path.

    On an RDB, running trials beat every heartbeat_interval seconds; a trial silent for twice that is failed
    by the next worker to start a trial, and stale_callback re-queues it.
    """
    if url is None or "://" not in url:
        path = Path(url or DEFAULT_JOURNAL)
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise StorageError(f"--storage {path}: cannot open journal file ({exc.strerror})") from None
    try:
        heartbeat = {} if not heartbeat_interval else {
            "heartbeat_interval": heartbeat_interval, "grace_period": 2 * heartbeat_interval,
            "heartbeat_stale_trial_callback": stale_callback}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable enough here
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **heartbeat)
    except ImportError as exc:
        raise StorageError(f"--storage {redact(url)}: database driver missing ({exc})") from None
    except Exception as exc:  # sqlalchemy's connection and URL errors have no common base worth naming
        raise StorageError(f"--storage {redact(url)}: cannot connect ({redact(first_line(exc))[:300]})") from None


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
        # never at the first eval: its loss mostly reflects the warm-up, not the configuration
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=eval_interval + 1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}")


@contextlib.contextmanager
def init_lock(storage_url: str | None, study_name: str):
    """Serialise first contact with fresh stores among processes on this machine.

    Creating the study, enqueueing the baseline, MLflow's schema migration and the parent run must happen
    once; concurrent first runs would race on each. The lock file lives in the temp directory, not here.
    """
    key = hashlib.sha256(f"{Path.cwd()}|{storage_url}|{study_name}".encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"chargpt-study-{key}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
