"""The study's Optuna parts: storage (embedded journal file or an RDB URL), sampler and pruner."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sys
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from study.errors import first_line, redact

DEFAULT_JOURNAL = "optuna.journal"
SAMPLERS = ("tpe", "random", "gp", "cmaes")
PRUNERS = ("asha", "hyperband", "median", "none")

# The pruner's axis: how far a trial is through its own schedule, in thousandths. Trials search max_iters and decay
# their learning rate over it (cosine), so step 250 is the end of a short trial's warm-up and a sliver of a long one;
# pruning at the same step ranks trials by how fast they warm up. At the same point of their schedules, a trial's
# loss compares with the others' as its final loss will.
SCHEDULE_POINTS = 1000


def schedule_point(step: int, max_iters: int) -> int:
    """The thousandths of its schedule a trial has done at this step (1000 at the last step)."""
    return SCHEDULE_POINTS * step // max_iters


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
            return PatientRDBStorage(url, engine_kwargs=engine_kwargs(url), **heartbeat)
    except ImportError as exc:
        raise StorageError(f"--storage {redact(url)}: database driver missing ({exc})") from None
    except Exception as exc:  # sqlalchemy's connection and URL errors have no common base worth naming
        raise StorageError(f"--storage {redact(url)}: cannot connect ({redact(first_line(exc))[:300]})") from None


# How long a study waits out a database it cannot reach (a restart, a full connection table) before a call fails.
DATABASE_PATIENCE_S = 180.0


def connection_lost(exc: BaseException | None) -> bool:
    """True when the error (or what caused it: Optuna wraps SQLAlchemy's) is the database not answering."""
    while exc is not None:
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.PendingRollbackError)) or \
                isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True  # PendingRollbackError: a session whose rollback failed with the connection
        exc = exc.__cause__ or exc.__context__
    return False


def _patient(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        deadline, delay = time.monotonic() + DATABASE_PATIENCE_S, 0.5
        while True:
            try:
                result = method(self, *args, **kwargs)
            except Exception as exc:
                if not connection_lost(exc) or time.monotonic() > deadline:
                    raise
                if not self.waiting:
                    self.waiting = True
                    print(f"storage: database unreachable ({first_line(exc.__cause__ or exc)[:200]}); "
                          f"retrying for up to {DATABASE_PATIENCE_S:.0f} s", file=sys.stderr, flush=True)
                with contextlib.suppress(Exception):
                    self.remove_session()  # the thread's session may hold the dead connection's failed transaction
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
                continue
            if self.waiting:
                self.waiting = False
                print("storage: database back", file=sys.stderr, flush=True)
            return result
    return call


class PatientRDBStorage(RDBStorage):
    """Optuna's RDBStorage, waiting out a database restart instead of failing the call, and with it the worker.

    A trial may end, or the next one start, while the database restarts; the pool reconnects once it answers.
    """

    waiting = False


for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
              "get_study_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
              "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_param",
              "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
              "get_trial", "get_all_trials", "get_n_trials", "get_best_trial", "record_heartbeat",
              # what Optuna's cache in front of every RDB storage calls instead of the public methods
              "_create_new_trial", "_get_trials", "_get_best_trial_id", "_set_trial_param", "_get_stale_trial_ids"):
    setattr(PatientRDBStorage, _name, _patient(getattr(RDBStorage, _name)))


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


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """Pruners count a trial's resource in thousandths of its schedule (SCHEDULE_POINTS).

    Successive halving (asha) keeps the best quarter of the trials at 1/16 and at 1/4 of their schedules (a trial's
    first eval at or past the point), and past 1/4 only a trial among the two best there: a pruned trial has cost a
    sixteenth of its length, or a quarter, and the last three quarters go to trials that may end as the best. Optuna's
    rule is asynchronous: while fewer than four trials have reached a point, only the best of them goes on. Hyperband
    runs successive halving (a third kept) in two brackets, one judging from 1/8 and one from 3/8 of the schedule.
    """
    if name == "asha":
        return HalvingToFinalists(min_resource=SCHEDULE_POINTS // 16, reduction_factor=4, rungs=2, finalists=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=SCHEDULE_POINTS // 8, max_resource=SCHEDULE_POINTS,
                                              reduction_factor=3)
    if name == "median":
        # against the trials that reported at the same point of their schedule, from a quarter of it on
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=SCHEDULE_POINTS // 4)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}")


class HalvingToFinalists(optuna.pruners.BasePruner):
    """Optuna's successive halving, and at its last rung a trial goes on only if it is among the `finalists` best
    of all the trials that reached that rung.

    A study minimises: what a trial costs after its last rung (three quarters of it, in asha) buys a result only if
    the trial may end as the best. The best quarter of a rung lets through most of a good region once the sampler
    has found it: in a cpu-preset study on 2 cores, the two trials that ran on from 1/4 of their schedules with two
    better trials there spent 15% of the first 30 minutes' trial time after it and ended at 1.61 and 1.63, the
    best being 1.59 by then (docs/benchmarks.md).
    """

    def __init__(self, min_resource: int, reduction_factor: int, rungs: int, finalists: int):
        self._halving = optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource,
                                                               reduction_factor=reduction_factor)
        self._last_step = min_resource * reduction_factor ** (rungs - 1)
        self._last_key = f"completed_rung_{rungs - 1}"  # where Optuna's halving records a trial's value at a rung
        self._finalists = finalists

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if self._last_key in trial.system_attrs:
            return False  # past the last rung at an earlier eval: no more cuts (Optuna's halving has more rungs)
        if self._halving.prune(study, trial):
            return True
        if trial.last_step < self._last_step:
            return False
        value = trial.intermediate_values[trial.last_step]
        better = [t.system_attrs[self._last_key] for t in study.get_trials(deepcopy=False)
                  if t.number != trial.number and self._last_key in t.system_attrs]
        sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
        return sum(sign * other < sign * value for other in better) >= self._finalists


# Every study process talks to an RDB through at most this many connections: one for the trial loop, one more while
# Optuna's heartbeat thread writes at the same moment; the process setting a study up holds one more, the set-up
# lock's, for the seconds that takes. 8 workers and their launcher hold at most 19 of PostgreSQL's default 100.
POOL_SIZE, POOL_OVERFLOW = 1, 1
APPLICATION_NAME = "chargpt-study"  # pg_stat_activity shows "chargpt-study:<pid>" for each connection
SETUP_LOCK_KEY = 0x63686172677074  # the PostgreSQL advisory lock serialising study set-ups in one database


def engine_kwargs(url: str) -> dict:
    kwargs = {"pool_pre_ping": True, "pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"application_name": f"{APPLICATION_NAME}:{os.getpid()}"}
    return kwargs


@contextlib.contextmanager
def setup_lock(url: str | None, on_wait=None):
    """Serialise the set-up of a study's stores among every process that shares them, on any machine.

    Creating Optuna's schema, the study, the baseline trial, MLflow's experiment and the parent run must happen
    once however many workers start together. The lock lives where every worker looks: in the database itself
    for PostgreSQL (an advisory lock) and MySQL (a named lock), and for a journal or SQLite
    store: an flock on the file itself (anyone sharing the store shares the file; Optuna's journal lock and
    SQLite's byte-range locks are separate locks). on_wait() is called if another process holds it.
    """
    if url is not None and "://" in url and not url.startswith("sqlite:///"):
        with _database_lock(url, on_wait):
            yield
        return
    path = Path(url.removeprefix("sqlite:///") if url else DEFAULT_JOURNAL)
    try:
        f = open(path, "a")  # creates the store's file as the store itself would
    except OSError as exc:
        raise StorageError(f"--storage {path}: cannot open ({exc.strerror})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _database_lock(url: str, on_wait):
    """A session-level lock in the database: released by the server if this process dies holding it."""
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                          **{k: v for k, v in engine_kwargs(url).items() if k == "connect_args"})
        conn = engine.connect()
    except ImportError as exc:
        raise StorageError(f"--storage {redact(url)}: database driver missing ({exc})") from None
    except Exception as exc:  # sqlalchemy's connection and URL errors have no common base worth naming
        raise StorageError(f"--storage {redact(url)}: cannot connect ({redact(first_line(exc))[:300]})") from None
    dialect = engine.dialect.name
    if dialect == "postgresql":
        take, wait, release = ("SELECT pg_try_advisory_lock(:k)", "SELECT pg_advisory_lock(:k)",
                               "SELECT pg_advisory_unlock(:k)")
    elif dialect in ("mysql", "mariadb"):
        take, wait, release = ("SELECT GET_LOCK(:k, 0)", "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)")
    else:  # no shared lock known for this database: set-up relies on the stores' own uniqueness checks
        take = wait = release = None
    key = {"k": SETUP_LOCK_KEY if dialect == "postgresql" else APPLICATION_NAME}
    try:
        with conn:
            if take and not conn.execute(sqlalchemy.text(take), key).scalar():
                if on_wait:
                    on_wait()
                conn.execute(sqlalchemy.text(wait), key)
            conn.commit()  # the lock is the session's, not the transaction's
            try:
                yield
            finally:
                if release:
                    conn.execute(sqlalchemy.text(release), key)
                    conn.commit()
    finally:
        engine.dispose()
