"""Trials as Ray tasks across a cluster: `python study/run.py --ray-address auto`.

The set-up runs once, here in the driver, as in local mode (stores, baseline, parent run); then each trial runs as a
Ray task on whichever node has its resources (`--threads T` CPUs, 1/K of a GPU with `--trials-per-gpu K`), joining
the stores itself, with the project's own trial code: the study's pruner and MLflow's nested runs work as locally.
The driver keeps the count. It draws exactly `--trials` trials; Ray never retries a task itself (a retry would draw a
new trial while the lost one stayed RUNNING); a task lost with its node has its trial failed, with a reason naming
the node, and re-queued by the driver, which then draws one more task.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import socket
import sys
import tarfile
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from model.data import PROJECT_ROOT
from study.errors import RayError, first_line
from study.recovery import StaleTrialHandler, fail_and_requeue
from study.settings import StudySettings
from study.setup import configure_libraries, join_stores
from study.spool.files import spool_root
from study.stopping import STOP_GRACE_S, Stop, stop_on_signals
from study.workers import run_trials

NODE_ATTR, TASK_ATTR, JOB_ATTR = "ray_node_id", "ray_task_id", "ray_job_id"
STOP_POLL_S = 1.0  # how often a task asks the driver's stop flag


def connect(address: str) -> None:
    """Join the cluster, shipping the project's packages to its nodes; RayError in one line if it is not there."""
    import ray

    host, _, port = address.rpartition(":")
    if address not in ("auto", "local") and not address.startswith("ray://") and port.isdigit():
        try:  # Ray itself waits minutes for a GCS that is not there
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise RayError(f"--ray-address {address}: unreachable ({exc.strerror or exc})") from None
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=True,
                 runtime_env={"py_modules": [str(PROJECT_ROOT / "model"), str(PROJECT_ROOT / "study")]})
    except Exception as exc:  # ConnectionError, or whatever the client mode raises
        raise RayError(f"--ray-address {address}: cannot connect ({first_line(exc)})") from None


def check_cluster(s: StudySettings) -> None:
    """Refuse stores that the cluster's nodes cannot share, before anything is created."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    local = s.storage is None or "://" not in s.storage or s.storage.startswith("sqlite:")
    if len(nodes) > 1 and local:
        raise RayError(f"--storage {s.storage or 'optuna.journal'}: a file store cannot be shared by the {len(nodes)} "
                       "nodes of a Ray cluster; give an RDB server's URL (postgresql://...)")
    hosts = {n["NodeManagerAddress"] for n in nodes}
    if len(hosts) > 1 and s.tracking_uri.startswith("sqlite:"):
        raise RayError(f"--tracking-uri {s.tracking_uri}: a file store cannot be shared by the {len(hosts)} machines "
                       "of a Ray cluster; give an MLflow server's URL (http://...)")


class StopFlag:
    """The driver's stop, where every task can read it (a Ray actor)."""

    def __init__(self):
        self.stopped = False

    def set(self) -> None:
        self.stopped = True

    def is_set(self) -> bool:
        return self.stopped


def _watch(flag, stop: Stop) -> None:
    """A task's thread: the driver's stop becomes the task's own, read at each training step."""
    import ray

    while stop.reason is None:
        with contextlib.suppress(Exception):  # the driver gone: the task ends with its job anyway
            if ray.get(flag.is_set.remote(), timeout=30):
                stop.request("the study was stopped")
                return
        time.sleep(STOP_POLL_S)


_joined: dict = {}  # a Ray worker process runs many tasks: it joins each study's stores once


def trial_task(s: StudySettings, index: int, launch_id: str, flag) -> dict:
    """One trial, on whichever node Ray placed it; returns whether it ran to its end, and the runs it spooled."""
    import ray
    import torch

    ctx = ray.get_runtime_context()
    # the task runs in a directory of Ray's: MLflow's own lookups (the registry's models:/ URIs) must find the study's
    # store, as they do in the study's directory
    os.environ["MLFLOW_TRACKING_URI"] = s.tracking_uri
    configure_libraries()
    torch.set_num_threads(s.threads or 1)
    key = (s.storage, s.study_name, s.tracking_uri)
    if key not in _joined:
        _joined[key] = (s.load_corpus(), *join_stores(s, StaleTrialHandler(), index))
    corpus, study, tracker = _joined[key]
    if ray.get(flag.is_set.remote()):  # stopped while this task waited for its node: draw no trial
        return {"done": False, "spool": None}
    stop = Stop()
    threading.Thread(target=_watch, args=(flag, stop), daemon=True).start()
    attrs = {"worker_index": index, "launch_id": launch_id, NODE_ATTR: ctx.get_node_id(),
             TASK_ATTR: ctx.get_task_id(), JOB_ATTR: ctx.get_job_id()}
    try:  # recovery is the driver's: a task never judges another node's trial
        done = run_trials(dataclasses.replace(s, trials=1), corpus, study, tracker, None, stop, attrs,
                          label=f"task {index}")
    finally:
        stop.request("task ended")  # ends the watching thread
        tracker.client.close()
    return {"done": done, "spool": _pack(tracker.client.pending_dirs())}


def _pack(dirs: list[Path]) -> bytes | None:
    """Runs still spooled on this node (the server is away), packed for the driver, then removed here: the node's
    task has ended and nobody here would replay them."""
    if not dirs:
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in dirs:
            tar.add(path, arcname=path.name)
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)
    return buffer.getvalue()


def resources(s: StudySettings) -> dict:
    """What one trial's task asks of its node."""
    asked = {"num_cpus": s.threads or 1}
    if s.trials_per_gpu:
        asked["num_gpus"] = 1 / s.trials_per_gpu
    return asked


def capacity(s: StudySettings) -> int:
    """Trials at once: --workers, else as many as the cluster's resources hold (at least one)."""
    import ray

    if s.workers:
        return s.workers
    total, need = ray.cluster_resources(), resources(s)
    fits = [int(total.get({"num_cpus": "CPU", "num_gpus": "GPU"}[k], 0) // v) for k, v in need.items() if v]
    return max(1, min(fits))


class RayLauncher:
    """The driver: draws the study's trials as Ray tasks, recovers those lost with their nodes, stops them all."""

    def __init__(self, settings: StudySettings):
        import ray

        self.ray, self.settings = ray, settings
        self.launch_id = time.strftime("%Y%m%d%H%M%S")
        self.stop = Stop()
        self.task = ray.remote(max_retries=0, **resources(settings))(trial_task)
        self.flag = ray.remote(num_cpus=0)(StopFlag).remote()
        self.pending: dict = {}  # object ref -> task index
        self.shipped = 0  # spooled runs received from nodes

    def run(self, study: optuna.Study, handler: StaleTrialHandler, tracker) -> bool:
        """Run the study's trials on the cluster; False when stopped."""
        s, ray = self.settings, self.ray
        left, cap, index, grace_until = s.trials, capacity(s), 0, None
        print(f"Ray cluster: {len(ray.nodes())} nodes, {ray.cluster_resources().get('CPU', 0):.0f} CPUs, "
              f"{ray.cluster_resources().get('GPU', 0):.0f} GPUs; {s.trials} trials, at most {cap} at once, each "
              f"{resources(s)}", flush=True)
        with stop_on_signals(self.stop):
            while self.pending or (left and not self.stop.requested):
                if s.deadline is not None and time.time() >= s.deadline:
                    left = 0  # --timeout: no trial starts after it
                while left and len(self.pending) < cap and not self.stop.requested:
                    ref = self.task.remote(s, index, self.launch_id, self.flag)
                    self.pending[ref], left, index = index, left - 1, index + 1
                done, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
                if self.stop.requested and grace_until is None:
                    grace_until = time.monotonic() + STOP_GRACE_S
                    self.flag.set.remote()
                for ref in done:
                    left += self._collect(ref, study, handler)
                if grace_until is not None and time.monotonic() > grace_until:  # tasks that did not stop in time
                    for ref in self.pending:
                        ray.cancel(ref, force=True)
                    grace_until = float("inf")
        if self.shipped:
            replayed = tracker.client.catch_up()
            print(f"{self.shipped} runs spooled on the nodes while the tracking server was away: {replayed} replayed"
                  + ("" if replayed else f", the rest wait in {spool_root(s.spool_dir)}"), flush=True)
        return not self.stop.requested

    def _collect(self, ref, study: optuna.Study, handler: StaleTrialHandler) -> int:
        """A finished task: its shipped spool kept; a lost one's trial failed and re-queued. Returns the trials to
        draw again (1 for a re-queued trial)."""
        index = self.pending.pop(ref)
        try:
            result = self.ray.get(ref)
        except (self.ray.exceptions.NodeDiedError, self.ray.exceptions.WorkerCrashedError,
                self.ray.exceptions.TaskCancelledError) as exc:
            return self._recover(ref.task_id().hex(), index, study, handler, exc)
        except self.ray.exceptions.RayTaskError as exc:  # the task could not join the study: no trial ran
            raise RayError(f"task {index}: {first_line(exc.cause)}") from None
        if result["spool"]:
            root = spool_root(self.settings.spool_dir)
            root.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(result["spool"]), mode="r:gz") as tar:
                self.shipped += len({name.split("/")[0] for name in tar.getnames()})
                tar.extractall(root, filter="data")
        return 0

    def _recover(self, task_id: str, index: int, study: optuna.Study, handler: StaleTrialHandler, exc) -> int:
        lost = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get(TASK_ATTR) == task_id]
        for trial in lost:
            node = trial.user_attrs.get(NODE_ATTR, "?")
            fail_and_requeue(study, handler, trial, f"Ray node {node} died during the trial")
        print(f"task {index} lost ({type(exc).__name__}): trials {[t.number for t in lost]} failed and re-queued",
              file=sys.stderr, flush=True)
        return 0 if self.stop.requested else 1
