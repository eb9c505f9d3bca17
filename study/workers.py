"""Workers: a process that runs trials on a study the set-up step created, and `--workers N` launching N of them.

A launched worker receives the study's settings object itself (pickled by multiprocessing's spawn), never a
command line to parse again; workers draw the launch's trials one at a time, and a killed worker is replaced while
trials are left.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import uuid

import optuna
import torch

from model.cli import fail
from study.objective import Objective, release_gpu_memory
from study.options import PROG
from study.progress import Progress
from study.recovery import StaleTrialHandler, recover_dead_workers
from study.settings import StudySettings, usable_cores
from study.setup import SETUP_ERRORS, configure_libraries, join_stores
from study.stopping import STOP_GRACE_S, Stop, die_with_parent, stop_on_signals
from study.tracking import StudyTracker

MAX_RESPAWNS = 2
INTERRUPTED = 130


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


def run_trials(s: StudySettings, corpus, study: optuna.Study, tracker: StudyTracker, handler: StaleTrialHandler | None,
               stop: Stop, attrs: dict | None = None, pool: TrialPool | None = None, label: str | None = None) -> bool:
    """This process's trials: the settings' number of them, or as many as it draws from a launch's pool; False when
    stopped. attrs go on each trial; a label (a worker's) replaces the progress bar by labelled lines."""
    objective = Objective(s, corpus, tracker, handler, attrs, stop)
    progress = Progress(s.trials, bar=label is None, prefix="" if label is None else f"[{label}] ")
    if stop.requested:
        return False
    if pool is not None and not pool.draw():
        return True
    try:
        timeout = None if s.deadline is None else max(0.0, s.deadline - time.time())
        # the stop callback comes before the pool's: a stopped worker draws nothing more
        study.optimize(objective, n_trials=None if pool else s.trials, timeout=timeout, catch=(Exception,),
                       callbacks=[release_gpu_memory, progress, stop, *([pool] if pool else [])], gc_after_trial=True)
    except KeyboardInterrupt:  # StudyStopped, or Ctrl-C where no handler could be installed (not the main thread)
        return False
    finally:
        progress.close()
    return not stop.requested


def worker_main(s: StudySettings, index: int, pool: TrialPool, launch_id: str, threads: int, stop_event,
                launcher_pid: int) -> None:
    """A launched worker process: join the stores, run trials while the pool has some and no stop was asked, exit 0
    (130 when stopped, by its launcher or by a signal of its own)."""
    die_with_parent(launcher_pid)
    with stop_on_signals(Stop(stop_event), f"worker {index}", relayed=True) as stop:
        configure_libraries()
        torch.set_num_threads(threads)
        handler = StaleTrialHandler()
        try:
            corpus = s.load_corpus()
            study, tracker = join_stores(s, handler, index)
        except SETUP_ERRORS as exc:
            fail(f"worker {index}: {exc}", PROG)
        try:
            done = run_trials(s, corpus, study, tracker, handler, stop, {"worker_index": index, "launch_id": launch_id},
                              pool, label=f"worker {index}")
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
    """Starts the study's workers, replaces one that dies while trials are left, and stops them all when asked.

    A stop (SIGTERM or Ctrl-C to this process, or a worker stopped by a signal of its own) sets the event the workers
    read and sends each SIGTERM: each fails its running trial as interrupted and exits; none draws another.
    """

    def __init__(self, settings: StudySettings):
        self.settings = settings
        self.spread_gpus = ":" not in settings.base.device  # --device cuda:N keeps every worker on GPU N
        self.threads = settings.threads or max(1, usable_cores() // settings.workers)
        self.launch_id = uuid.uuid4().hex[:12]
        self.procs: dict[int, multiprocessing.Process] = {}
        self.pool = TrialPool(settings.trials)
        self.stop = Stop(multiprocessing.get_context("spawn").Event())

    def spawn(self, index: int) -> None:
        proc = multiprocessing.get_context("spawn").Process(
            target=worker_main, args=(self.settings, index, self.pool, self.launch_id, self.threads,
                                      self.stop.shared, os.getpid()),
            name=f"study-worker-{index}")
        with environment(worker_env(index, self.threads, self.spread_gpus)):
            proc.start()
        self.procs[index] = proc

    def run(self, study: optuna.Study, handler: StaleTrialHandler) -> bool:
        """Start the workers and wait for them; False when the study was stopped."""
        workers = min(self.settings.workers, self.settings.trials)
        respawns = dict.fromkeys(range(workers), 0)
        with stop_on_signals(self.stop):
            for index in range(workers):
                self.spawn(index)
            self._announce()
            self._wait(study, handler, respawns)
        recover_dead_workers(study, handler)
        return not self.stop.requested

    def _announce(self) -> None:
        gpus = min(torch.cuda.device_count(), self.settings.workers) if self.spread_gpus else 1
        where = f"{gpus} GPU{'s' * (gpus > 1)}, " if torch.cuda.is_available() else ""
        threads = f"{self.threads} CPU thread{'s' * (self.threads > 1)}"
        print(f"{len(self.procs)} workers on {where}{threads} each, {self.settings.trials} trials, each worker "
              "starting the next as it finishes one", flush=True)

    def _wait(self, study: optuna.Study, handler: StaleTrialHandler, respawns: dict[int, int]) -> None:
        deadline = None  # once stopping: when the workers still running are killed
        while self.procs:
            multiprocessing.connection.wait([p.sentinel for p in self.procs.values()], timeout=0.2)
            if self.stop.requested and deadline is None:
                deadline = time.monotonic() + STOP_GRACE_S
                self._signal_workers()
            for index, proc in list(self.procs.items()):
                if proc.exitcode is None:
                    continue
                del self.procs[index]
                proc.join()
                if proc.exitcode == 0:
                    continue
                if proc.exitcode == INTERRUPTED:  # stopped by a signal of its own (a scheduler's, say): stop all
                    self.stop.request(f"worker {index} was stopped")
                    continue
                recovered = recover_dead_workers(study, handler)
                self.pool.give_back(len(recovered))
                left = self.pool.left.value
                print(f"worker {index} exited with {proc.exitcode}; trials {recovered} failed and re-queued; "
                      f"{left} trials not yet started", flush=True)
                if left > 0 and respawns[index] < MAX_RESPAWNS and not self.stop.requested:
                    respawns[index] += 1
                    self.spawn(index)
            if deadline is not None and time.monotonic() > deadline:
                for index, proc in self.procs.items():
                    print(f"worker {index} did not stop within {STOP_GRACE_S:.0f} s: killed", flush=True)
                    proc.kill()
                deadline = math.inf  # the next rounds collect them

    def _signal_workers(self) -> None:
        """The stop, told to every worker: the event for one between trials, SIGTERM for one inside a trial."""
        self.stop.shared.set()
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
