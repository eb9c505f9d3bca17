"""Workers: a process that runs trials on a study the set-up step created, and `--workers N` launching N of them.

A launched worker receives the study's settings object itself (pickled by multiprocessing's spawn), never a
command line to parse again; a killed worker is replaced for the rest of its share.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import time
import uuid

import optuna
import torch
from optuna.trial import TrialState

from model.cli import fail
from model.config import ConfigError
from model.data import DataError
from study.objective import Objective, release_gpu_memory
from study.progress import Progress
from study.recovery import STALE_ATTR, StaleTrialHandler, recover_dead_workers
from study.settings import StudySettings
from study.setup import join_stores
from study.space import SpaceError
from study.storage import StorageError
from study.tracking import StudyTracker, TrackingError

MAX_RESPAWNS = 2
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
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


def run_trials(s: StudySettings, corpus, study: optuna.Study, tracker: StudyTracker, handler: StaleTrialHandler,
               trials: int, worker_index: int | None = None, launch_id: str | None = None) -> bool:
    """This process's trials; False when interrupted by Ctrl-C."""
    attrs = {} if worker_index is None else {"worker_index": worker_index, "launch_id": launch_id}
    objective = Objective(s.space, s.base, corpus, tracker, s.objective, s.sample, s.pruner != "none", handler, attrs)
    progress = Progress(trials, bar=worker_index is None,
                        prefix="" if worker_index is None else f"[worker {worker_index}] ")
    try:
        study.optimize(objective, n_trials=trials, timeout=s.timeout, catch=(Exception,),
                       callbacks=[release_gpu_memory, progress], gc_after_trial=True)
    except KeyboardInterrupt:
        return False
    finally:
        progress.close()
    return True


def worker_main(s: StudySettings, index: int, trials: int, launch_id: str, threads: int) -> None:
    """A launched worker process: join the stores, run its share of the trials, exit 0 (130 when interrupted)."""
    configure_libraries()
    torch.set_num_threads(threads)
    handler = StaleTrialHandler()
    try:
        corpus = s.load_corpus()
        study, tracker = join_stores(s, handler, index)
    except SETUP_ERRORS as exc:
        fail(f"worker {index}: {exc}", "python study/run.py")
    try:
        done = run_trials(s, corpus, study, tracker, handler, trials, index, launch_id)
    except KeyboardInterrupt:
        done = False
    finally:
        tracker.client.close()
    sys.exit(0 if done else INTERRUPTED)


def shares(trials: int, workers: int) -> list[int]:
    """Split trials as evenly as possible: exactly the requested number in total."""
    return [trials // workers + (i < trials % workers) for i in range(workers)]


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


def done_by(study: optuna.Study, launch_id: str, index: int) -> int:
    """Trials worker `index` of this launch finished (those failed because a worker died do not count)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED)
               if t.user_attrs.get("launch_id") == launch_id and t.user_attrs.get("worker_index") == index
               and not t.user_attrs.get(STALE_ATTR))


class Launcher:
    def __init__(self, settings: StudySettings):
        self.settings = settings
        self.spread_gpus = ":" not in settings.base.device  # --device cuda:N keeps every worker on GPU N
        self.threads = settings.threads or max(1, len(os.sched_getaffinity(0)) // settings.workers)
        self.launch_id = uuid.uuid4().hex[:12]
        self.procs: dict[int, multiprocessing.Process] = {}

    def spawn(self, index: int, share: int) -> None:
        proc = multiprocessing.get_context("spawn").Process(
            target=worker_main, args=(self.settings, index, share, self.launch_id, self.threads),
            name=f"study-worker-{index}")
        with environment(worker_env(index, self.threads, self.spread_gpus)):
            proc.start()
        self.procs[index] = proc

    def run(self, study: optuna.Study, handler: StaleTrialHandler) -> bool:
        """Start the workers and wait; a worker that dies is replaced for the rest of its share.

        Returns False when interrupted (Ctrl-C reaches the workers too; each fails its running trial).
        """
        plan = dict(enumerate(shares(self.settings.trials, self.settings.workers)))  # each index's share
        respawns = dict.fromkeys(plan, 0)
        for index, share in plan.items():
            if share:
                self.spawn(index, share)
        gpus = min(torch.cuda.device_count(), self.settings.workers) if self.spread_gpus else 1
        where = f"{gpus} GPU{'s' * (gpus > 1)}, " if torch.cuda.is_available() else ""
        threads = f"{self.threads} CPU thread{'s' * (self.threads > 1)}"
        print(f"{len(self.procs)} workers on {where}{threads} each, trials {list(plan.values())}", flush=True)
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
                    left = plan[index] - done_by(study, self.launch_id, index)
                    print(f"worker {index} exited with {proc.exitcode}; trials {recovered} failed and re-queued; "
                          f"{left} of its trials left", flush=True)
                    if left > 0 and respawns[index] < MAX_RESPAWNS and proc.exitcode != INTERRUPTED:
                        respawns[index] += 1
                        self.spawn(index, left)
        except KeyboardInterrupt:
            for proc in self.procs.values():
                proc.join()
            recover_dead_workers(study, handler)
            return False
        recover_dead_workers(study, handler)
        return True
