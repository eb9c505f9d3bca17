"""Workers: a process that runs trials on a study the set-up step created, and `--workers N` launching N of them.

A launched worker receives the study's settings object itself (pickled by multiprocessing's spawn), never a
command line to parse again; workers draw the launch's trials one at a time, and a killed worker is replaced while
trials are left.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid

import optuna
import torch

from model.cli import fail
from model.config import ConfigError
from model.data import DataError
from study.objective import Objective, release_gpu_memory
from study.progress import Progress
from study.recovery import StaleTrialHandler, recover_dead_workers
from study.settings import StudySettings, usable_cores
from study.setup import join_stores
from study.space import SpaceError
from study.storage import StorageError
from study.tracking import StudyTracker, TrackingError

MAX_RESPAWNS = 2
SETUP_ERRORS = (ConfigError, DataError, SpaceError, StorageError, TrackingError)
INTERRUPTED = 130


def configure_libraries() -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours to print
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the study prints its runs page once
    # A write to a tracking server that is away fails in seconds (MLflow's defaults retry for minutes) and is
    # spooled; the timeout is per socket operation, so large uploads still go through.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@contextlib.contextmanager
def terminate_as_interrupt(before=None):
    """SIGTERM (`kill PID`) stops a study as Ctrl-C does: the running trials are failed and the study's run closed.

    before() runs first: a launcher interrupts its workers, which would otherwise go on drawing the launch's trials
    with no one waiting for them. Signal handlers belong to the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        if before is not None:
            before()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TrialPool:
    """A launch's trials, which its workers draw one at a time as they finish the last: however long each trial
    takes, no worker sits idle while trials are left (fixed shares left one of two workers idle for half of a
    cpu-preset study, docs/benchmarks.md). Shared by the processes of one machine."""

    def __init__(self, trials: int):
        self.left = multiprocessing.get_context("spawn").Value("i", trials)

    def draw(self) -> bool:
        with self.left.get_lock():
            if self.left.value <= 0:
                return False
            self.left.value -= 1
            return True

    def give_back(self, trials: int) -> None:
        """Trials drawn by a worker that died: they failed and were re-queued, and run again from the pool."""
        with self.left.get_lock():
            self.left.value += trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Study callback: draw the next trial, or stop this worker."""
        if not self.draw():
            study.stop()


def run_trials(s: StudySettings, corpus, study: optuna.Study, tracker: StudyTracker, handler: StaleTrialHandler,
               trials: int, worker_index: int | None = None, launch_id: str | None = None,
               pool: TrialPool | None = None) -> bool:
    """This process's trials: `trials` of them, or as many as it draws from a launch's pool; False when interrupted
    by Ctrl-C."""
    attrs = {} if worker_index is None else {"worker_index": worker_index, "launch_id": launch_id}
    objective = Objective(s.space, s.base, corpus, tracker, s.objective, s.sample, s.pruner != "none", handler, attrs)
    progress = Progress(trials, bar=worker_index is None,
                        prefix="" if worker_index is None else f"[worker {worker_index}] ")
    if pool is not None and not pool.draw():
        return True
    try:
        study.optimize(objective, n_trials=None if pool else trials, timeout=s.timeout, catch=(Exception,),
                       callbacks=[release_gpu_memory, progress, *([pool] if pool else [])], gc_after_trial=True)
    except KeyboardInterrupt:
        return False
    finally:
        progress.close()
    return True


def worker_main(s: StudySettings, index: int, pool: TrialPool, launch_id: str, threads: int) -> None:
    """A launched worker process: join the stores, run trials while the pool has some, exit 0 (130 when
    interrupted)."""
    configure_libraries()
    torch.set_num_threads(threads)
    handler = StaleTrialHandler()
    try:
        corpus = s.load_corpus()
        study, tracker = join_stores(s, handler, index)
    except SETUP_ERRORS as exc:
        fail(f"worker {index}: {exc}", "python study/run.py")
    try:
        done = run_trials(s, corpus, study, tracker, handler, s.trials, index, launch_id, pool)
    except KeyboardInterrupt:
        done = False
    finally:
        tracker.client.close()
    sys.exit(0 if done else INTERRUPTED)


def worker_env(index: int, threads: int, spread_gpus: bool = True) -> dict:
    """Round-robin GPUs when there are several (unless told not to); on one GPU or the CPU the workers share it.

    torch.compile's code generation uses as many processes as there are cores unless told otherwise:
    each worker gets its share, as for training threads.
    """
    env = os.environ.copy()
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
    gpus = torch.cuda.device_count()
    if gpus > 1 and spread_gpus:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(g) for g in range(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    return env


@contextlib.contextmanager
def environment(env: dict):
    """os.environ replaced for the duration: a spawned process starts with the environment of the moment."""
    saved = os.environ.copy()
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class Launcher:
    def __init__(self, settings: StudySettings):
        self.settings = settings
        self.spread_gpus = ":" not in settings.base.device  # --device cuda:N keeps every worker on GPU N
        self.threads = settings.threads or max(1, usable_cores() // settings.workers)
        self.launch_id = uuid.uuid4().hex[:12]
        self.procs: dict[int, multiprocessing.Process] = {}
        self.pool = TrialPool(settings.trials)

    def spawn(self, index: int) -> None:
        proc = multiprocessing.get_context("spawn").Process(
            target=worker_main, args=(self.settings, index, self.pool, self.launch_id, self.threads),
            name=f"study-worker-{index}")
        with environment(worker_env(index, self.threads, self.spread_gpus)):
            proc.start()
        self.procs[index] = proc

    def run(self, study: optuna.Study, handler: StaleTrialHandler) -> bool:
        """Start the workers and wait; a worker that dies is replaced while trials are left.

        Returns False when interrupted (Ctrl-C reaches the workers too; each fails its running trial).
        """
        workers = min(self.settings.workers, self.settings.trials)
        respawns = dict.fromkeys(range(workers), 0)
        with terminate_as_interrupt(self.interrupt_workers):
            for index in range(workers):
                self.spawn(index)
            return self._wait(study, handler, respawns)

    def interrupt_workers(self) -> None:
        """Ctrl-C for the workers alone, as when this process is sent SIGTERM."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)

    def _wait(self, study: optuna.Study, handler: StaleTrialHandler, respawns: dict[int, int]) -> bool:
        gpus = min(torch.cuda.device_count(), self.settings.workers) if self.spread_gpus else 1
        where = f"{gpus} GPU{'s' * (gpus > 1)}, " if torch.cuda.is_available() else ""
        threads = f"{self.threads} CPU thread{'s' * (self.threads > 1)}"
        print(f"{len(self.procs)} workers on {where}{threads} each, {self.settings.trials} trials, each worker "
              "starting the next as it finishes one", flush=True)
        try:
            while self.procs:
                time.sleep(0.5)
                for index, proc in list(self.procs.items()):
                    if proc.exitcode is None:
                        continue
                    del self.procs[index]
                    proc.join()
                    if proc.exitcode == 0:
                        continue
                    recovered = recover_dead_workers(study, handler)
                    self.pool.give_back(len(recovered))
                    left = self.pool.left.value
                    print(f"worker {index} exited with {proc.exitcode}; trials {recovered} failed and re-queued; "
                          f"{left} trials not yet started", flush=True)
                    if left > 0 and respawns[index] < MAX_RESPAWNS and proc.exitcode != INTERRUPTED:
                        respawns[index] += 1
                        self.spawn(index)
        except KeyboardInterrupt:
            for proc in self.procs.values():
                proc.join()
            recover_dead_workers(study, handler)
            return False
        recover_dead_workers(study, handler)
        return True
