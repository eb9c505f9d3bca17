"""Tracking that outlives the MLflow server: writes spooled to local disk while it is away, replayed once it is back.

As W&B's offline mode and `wandb sync`: a trial never waits on the tracking server. Each write of a run goes
either to MLflow or, from the first one that finds the server away until a replay catches up, to that run's
spool directory (files.py), in order. Replays (replay.py) run when a probe of the server's
/health answers, at the study's next run, and by `python study/sync.py`.
"""
from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from mlflow import MlflowClient

from study.errors import health_error, is_outage, now_ms, redact, transport_gist
from study.spool.files import SPOOL_PREFIX, RunSpool, is_spool_id, spool_root
from study.spool.replay import Deferred, replay_root, resolve_or_defer

# While behind, writes probe the server at most this often (seconds); each probe waits PROBE_TIMEOUT_S at most.
PROBE_INTERVAL_S = 10.0
PROBE_TIMEOUT_S = 3.0


def server_up(tracking_uri: str) -> bool:
    return health_error(tracking_uri, PROBE_TIMEOUT_S) is None


class SpoolingClient:
    """The study's MLflow writes, spooled while an http(s) tracking server is away; reads go straight to MlflowClient.

    With a local store (sqlite) nothing is spooled. Thread-safe: system metrics are logged from their own thread.
    """

    def __init__(self, tracking_uri: str, spool_dir: str | None = None, offline: bool = False):
        self.mlflow = MlflowClient(tracking_uri)
        self.tracking_uri, self.root = tracking_uri, spool_root(spool_dir)
        self.spools = tracking_uri.startswith(("http://", "https://"))
        self.offline = offline and self.spools  # offline=True spools from the first write on, as W&B's offline mode
        self.experiment_id: str | None = None  # the study's, set once it is known; replays resolve local ids in it
        self._lock = threading.RLock()
        self._open: dict[str, RunSpool] = {}  # run -> the directory its writes go to now (locked)
        self._own: dict[Path, str] = {}  # every directory this process wrote that is not replayed yet -> its run
        self._running: set[str] = set()  # runs this process created and has not ended
        self._replayed: dict[str, str] = {}  # local spool id -> MLflow run id
        self._last_probe = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        """Reads, and the writes that set the study up (made while the server has just answered), are MlflowClient's."""
        return getattr(self.mlflow, name)

    # writes
    def create_run_id(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
        """A new run's id: MLflow's, or a local `spool-...` id while the server is away."""
        start = now_ms()
        op = {"op": "create_run", "experiment_id": experiment_id, "run_name": run_name, "tags": tags,
              "start_time": start}
        with self._lock:
            local = SPOOL_PREFIX + uuid.uuid4().hex[:16]
            self._running.add(local)  # before the write: a spool made for it ends the run if its writer dies
            ref = self._write(local, op, lambda _: self.mlflow.create_run(
                experiment_id, start_time=start, tags=tags, run_name=run_name).info.run_id) or local
            if ref != local:
                self._running.discard(local)
                self._running.add(ref)
            return ref

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        op = {"op": "log_batch", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
              "params": [[p.key, p.value] for p in params], "tags": [[t.key, t.value] for t in tags]}
        self._write(run_id, op, lambda rid: self.mlflow.log_batch(rid, metrics=[*metrics], params=[*params],
                                                                    tags=[*tags]))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        op = {"op": "log_text", "text": text, "artifact_file": artifact_file}
        self._write(run_id, op, lambda rid: self.mlflow.log_text(rid, text, artifact_file))

    def log_dict(self, run_id: str, dictionary: dict, artifact_file: str) -> None:
        op = {"op": "log_dict", "dictionary": dictionary, "artifact_file": artifact_file}
        self._write(run_id, op, lambda rid: self.mlflow.log_dict(rid, dictionary, artifact_file))

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        """local_dir may be temporary: a spooled write keeps a copy."""
        op = {"op": "log_artifacts", "artifact_path": artifact_path}
        self._write(run_id, op, lambda rid: self.mlflow.log_artifacts(rid, local_dir, artifact_path), files=local_dir)

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        op = {"op": "set_terminated", "status": status, "end_time": end_time or now_ms()}
        with self._lock:
            self._write(run_id, op, lambda rid: self.mlflow.set_terminated(rid, status, op["end_time"]))
            self._running.discard(run_id)

    def call_or_spool(self, run_id: str, fn: Callable[..., Any], /, **kwargs) -> Any:
        """fn(MlflowClient, **kwargs) now, or spooled with run_id's writes and called at replay (run ids among the
        kwargs then resolved). For the study's compound writes (model registry, checkpoint copy); kwargs are JSON."""
        op = {"op": "call", "fn": f"{fn.__module__}:{fn.__name__}", "kwargs": kwargs}

        def now(_: str) -> Any:
            resolved = {k: self._resolve(v) if is_spool_id(v) else v for k, v in kwargs.items()}
            return fn(self.mlflow, **resolved)

        with self._lock:
            try:
                return self._write(run_id, op, now)
            except Deferred:  # it names a run still spooled
                return self._spool(run_id, op)

    # replay
    def catch_up(self) -> int:
        """Probe the server; when it answers, replay the spool for this tracking URI (this process's runs and those
        others left); returns the runs replayed."""
        with self._lock:
            self._last_probe = time.monotonic()
            if not self.spools or not server_up(self.tracking_uri):
                return 0
            own = {spool.path: spool for spool in self._open.values()}
            result = replay_root(self.mlflow, self.root, self.tracking_uri, own)
            self._replayed.update({ref: rid for ref, rid in result.replayed.items() if is_spool_id(ref) and rid})
            self._open = {ref: spool for ref, spool in self._open.items() if spool.path.exists()}
            self._own = {path: ref for path, ref in self._own.items() if path.exists()}
            if result.outage is not None:
                self._went_away(result.outage)
                return len(result.replayed)
            self.offline = False
            if result.replayed:
                behind = f"; {self.behind()} still spooled in {self.root}" if self._own else ""
                print(f"tracking: {'caught up, ' if not self._own else ''}{len(result.replayed)} runs replayed to "
                      f"{redact(self.tracking_uri)}{behind}", file=sys.stderr, flush=True)
            return len(result.replayed)

    def pending_dirs(self) -> list[Path]:
        """The spool directories this process wrote that are not replayed yet (after close(), none is held)."""
        with self._lock:
            return [path for path in self._own if path.exists()]

    def behind(self) -> int:
        """Runs this process has spooled and not replayed."""
        return len(set(self._own.values()))

    def close(self) -> None:
        """At the study's end: one last replay when something is left, then hand what remains to later replays."""
        with self._lock:
            if self._own:
                self.catch_up()
            for spool in self._open.values():  # nothing more will be appended (the Python API's process goes on)
                spool.release()
            self._open.clear()
            if self._own:
                print(f"tracking: {self.behind()} runs stay spooled in {self.root}; they are replayed at the study's "
                      "next run, or by `python study/sync.py` once the server is back", file=sys.stderr, flush=True)

    # routing
    def _write(self, ref: str, op: dict, online: Callable[[str], Any], files: str | None = None) -> Any:
        with self._lock:
            if self._spooling(ref):
                return self._spool(ref, op, files)
            try:
                return online(self._replayed.get(ref, ref))
            except Deferred:
                raise
            except Exception as exc:
                if not (self.spools and is_outage(exc)):
                    raise
                if server_up(self.tracking_uri):  # a blip, or an error of the server's own: once more, then it stands
                    return online(self._replayed.get(ref, ref))
                self._went_away(exc)
            return self._spool(ref, op, files)

    def _spooling(self, ref: str) -> bool:
        """True while the server is away, or while earlier writes of this run wait in the spool (order matters)."""
        if not self.spools:
            return False
        if (self.offline or self._own) and time.monotonic() - self._last_probe >= PROBE_INTERVAL_S:
            self.catch_up()
        return self.offline or ref in self._own.values()

    def _spool(self, ref: str, op: dict, files: str | None = None) -> None:
        spool = self._open.get(ref)
        if spool is None:
            self.root.mkdir(parents=True, exist_ok=True)
            spool = RunSpool.create(self.root, ref, self.tracking_uri, self.experiment_id, ref in self._running)
            self._open[ref], self._own[spool.path] = spool, ref
        if files is not None:
            op = {**op, "files": spool.keep_files(files)}
        spool.append(op)
        if op["op"] == "set_terminated":  # nothing more to append: anyone may replay it now
            self._open.pop(ref).release()

    def _resolve(self, ref: str) -> str:
        if ref in self._replayed:
            return self._replayed[ref]
        return resolve_or_defer(self.mlflow, self.experiment_id, ref, self.root)

    def _went_away(self, exc: BaseException) -> None:
        self._last_probe = time.monotonic()
        if not self.offline:
            self.offline = True
            print(f"tracking: MLflow server at {redact(self.tracking_uri)} unreachable ({transport_gist(exc)}); "
                  f"spooling to {self.root}, replayed when it is back", file=sys.stderr, flush=True)

