"""Replaying spooled runs into MLflow: each run's writes in order, resumable, each run directory deleted once done."""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from study.errors import WORKER_DIED, describe_error, is_outage
from study.spool.files import RunSpool, SpoolError, is_spool_id, read_meta, run_dirs

SPOOL_ID_TAG = "spool_id"  # on a run created by a replay: the local id the study knew it by


def resolve_run_id(client: MlflowClient, experiment_id: str | None, ref: str) -> str | None:
    """The MLflow run id for a trial's `mlflow_run_id`: itself, or for a run spooled offline the run its replay
    created (tagged spool_id); None while that run is not replayed yet."""
    if not is_spool_id(ref):
        return ref
    if experiment_id is None:
        return None
    runs = client.search_runs([experiment_id], filter_string=f"tags.{SPOOL_ID_TAG} = '{ref}'", max_results=1)
    return runs[0].info.run_id if runs else None


class Deferred(Exception):
    """A write names a spooled run not replayed yet (its writer still holds it): try again later."""


@dataclass
class Pass:
    """One replay pass over a spool root; what it did, for the console."""

    replayed: dict[str, str] = field(default_factory=dict)  # local ref -> MLflow run id
    held: list[Path] = field(default_factory=list)  # directories whose writer still holds them
    deferred: list[Path] = field(default_factory=list)
    outage: BaseException | None = None


def replay_root(client: MlflowClient, root: Path, tracking_uri: str, own: dict[Path, RunSpool] | None = None,
                log=print) -> Pass:
    """Replay every directory for tracking_uri that nobody holds, plus this process's own (in `own`), oldest first.

    A run whose writer died before ending it is ended KILLED. Stops at the first outage; progress is kept.
    """
    own, result, blocked = own or {}, Pass(), set()
    for path in run_dirs(root):
        try:
            meta = read_meta(path)
        except SpoolError:
            continue  # a directory being deleted, or not ours: sync reports malformed ones
        if meta["tracking_uri"] != tracking_uri:
            continue
        if meta["ref"] in blocked:  # an earlier directory of the same run is waiting: keep the order
            result.deferred.append(path)
            continue
        spool = own.get(path) or RunSpool.claim(path)
        if spool is None:
            result.held.append(path)
            blocked.add(meta["ref"])
            continue
        try:
            run_id = replay_run(client, spool, root, writer_alive=path in own, log=log)
        except Deferred:
            result.deferred.append(path)
            blocked.add(meta["ref"])
            if path not in own:
                spool.release()
            continue
        except Exception as exc:
            if path not in own:
                spool.release()
            if is_outage(exc):
                result.outage = exc
                return result
            raise
        # a run's later directory may hold only compound writes: keep the id an earlier one resolved
        result.replayed[spool.ref] = run_id or result.replayed.get(spool.ref) or \
            (None if is_spool_id(spool.ref) else spool.ref)
        own.pop(path, None)
        spool.delete()
    return result


def replay_run(client: MlflowClient, spool: RunSpool, root: Path, writer_alive: bool, log=print) -> str | None:
    """Apply the directory's writes not applied yet, saving progress after each request; returns the run's id."""
    meta, progress, ops = spool.meta, spool.progress(), spool.ops()
    run_id, i = progress["run_id"], progress["applied"]

    def target() -> str:
        nonlocal run_id
        if run_id is None:
            run_id = resolve_or_defer(client, meta["experiment_id"], spool.ref, root, spool.path)
        return run_id

    while i < len(ops):
        op, n = ops[i], 1
        try:
            if op["op"] == "create_run":
                run_id = resolve_run_id(client, op["experiment_id"], spool.ref) or client.create_run(
                    op["experiment_id"], start_time=op["start_time"], run_name=op["run_name"],
                    tags={**op["tags"], SPOOL_ID_TAG: spool.ref}).info.run_id
            elif op["op"] == "log_batch":
                batch = _mergeable(ops, i)
                n = len(batch)
                client.log_batch(target(), metrics=[Metric(*m) for b in batch for m in b["metrics"]],
                                 params=[Param(*p) for p in op["params"]], tags=[RunTag(*t) for t in op["tags"]])
            elif op["op"] == "log_text":
                client.log_text(target(), op["text"], op["artifact_file"])
            elif op["op"] == "log_dict":
                client.log_dict(target(), op["dictionary"], op["artifact_file"])
            elif op["op"] == "log_artifacts":
                client.log_artifacts(target(), str(spool.path / op["files"]), op["artifact_path"])
            elif op["op"] == "set_terminated":
                client.set_terminated(target(), op["status"], end_time=op["end_time"])
            elif op["op"] == "call":
                kwargs = {k: resolve_or_defer(client, meta["experiment_id"], v, root, spool.path)
                          if is_spool_id(v) else v for k, v in op["kwargs"].items()}
                _function(op["fn"])(client, **kwargs)
            else:
                raise SpoolError(f"{spool.path}: unknown write {op['op']!r}")
        except (Deferred, SpoolError):
            raise
        except Exception as exc:
            if is_outage(exc):
                raise
            # a write the server refuses (the run deleted meanwhile, say) would block the spool for good
            log(f"tracking: write {i + 1} of spooled run {spool.ref} not replayed ({describe_error(exc)})",
                file=sys.stderr)
        i += n
        spool.save_progress(i, run_id)
    if meta["ends_run"] and not writer_alive and not any(op["op"] == "set_terminated" for op in ops):
        # its writer died before ending the run, as a dead worker's trial: end it as recovery does
        client.log_batch(target(), tags=[RunTag("optuna_state", "FAIL"), RunTag("failure_reason", WORKER_DIED)])
        client.set_terminated(target(), "KILLED")
    return run_id


def _mergeable(ops: list[dict], i: int) -> list[dict]:
    """ops[i] and the metric-only log_batch writes after it, up to one request's worth of metrics."""
    batch, count = [ops[i]], len(ops[i]["metrics"])
    for op in ops[i + 1:]:
        if op["op"] != "log_batch" or op["params"] or op["tags"] or count + len(op["metrics"]) > MAX_METRICS_PER_BATCH:
            break
        batch.append(op)
        count += len(op["metrics"])
    return batch


def resolve_or_defer(client: MlflowClient, experiment_id: str | None, ref: str, root: Path,
                     here: Path | None = None) -> str:
    """A run id for ref; Deferred while an earlier spool directory of that run waits, else the ref as it is."""
    run_id = resolve_run_id(client, experiment_id, ref)
    if run_id is not None:
        return run_id
    if any(p.name.endswith(f"-{ref}") and p != here for p in run_dirs(root)):
        raise Deferred(ref)
    return ref  # a run spooled elsewhere: the write fails on the server and says so


def _function(path: str):
    """A study function a spooled write calls at replay, named module:function."""
    module, name = path.split(":")
    if not module.startswith("study."):
        raise SpoolError(f"spooled call to {path} is not the study's")
    return getattr(importlib.import_module(module), name)
