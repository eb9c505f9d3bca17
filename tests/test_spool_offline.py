"""The outage spool without a server: its files on disk, and replays into a local sqlite MLflow store.

A SpoolingClient offline from its first write (a tracking server address nobody listens on) stands for a study
whose server is away; the replay writes into an MlflowClient on sqlite, as it would into the server come back.
The end-to-end cases, with a real `mlflow server` stopped and started, are in test_spool.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from model.data import PROJECT_ROOT
from study.errors import WORKER_DIED
from study.spool import SpoolingClient
from study.spool import client as spool
from study.spool.files import SpoolError, read_meta, run_dirs
from study.spool.replay import SPOOL_ID_TAG, replay_root, resolve_run_id

AWAY = "http://127.0.0.1:9"  # the discard port: nothing answers


@pytest.fixture
def local(tmp_path) -> tuple[MlflowClient, str]:
    """An MLflow store on sqlite standing for the server once it is back, and its experiment."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.create_experiment("spooled")


@pytest.fixture(autouse=True)
def no_probes(monkeypatch):
    monkeypatch.setattr(spool, "PROBE_INTERVAL_S", 1e9)  # the offline client never looks for the server


def spool_a_run(root, experiment_id: str, steps: int, artifacts=None) -> str:
    client = SpoolingClient(AWAY, str(root), offline=True)
    client.experiment_id = experiment_id
    run = client.create_run_id(experiment_id, "trial-000", {"optuna_state": "RUNNING"})
    for step in range(1, steps + 1):
        client.log_batch(run, metrics=[Metric("loss", 1 / step, 0, step)], tags=[RunTag("last_step", str(step))])
    client.log_text(run, "ROMEO: hello", "sample.txt")
    if artifacts is not None:
        client.log_artifacts(run, str(artifacts), "checkpoint")
    client.set_terminated(run, "FINISHED")
    return run


def test_a_spooled_run_is_one_directory_of_its_writes_in_order(tmp_path, local):
    _, experiment_id = local
    ref = spool_a_run(tmp_path / "spool", experiment_id, steps=3)
    (path,) = run_dirs(tmp_path / "spool")
    meta = read_meta(path)
    assert ref.startswith("spool-") and meta["ref"] == ref
    assert meta["tracking_uri"] == AWAY and meta["experiment_id"] == experiment_id and meta["ends_run"]
    ops = [json.loads(line) for line in (path / "ops.jsonl").read_text().splitlines()]
    assert [op["op"] for op in ops] == ["create_run", "log_batch", "log_batch", "log_batch", "log_text",
                                        "set_terminated"]
    assert [op["metrics"][0][3] for op in ops[1:4]] == [1, 2, 3]  # steps, in the order they were logged


def test_a_replay_restores_the_run_whole_and_empties_the_spool(tmp_path, local):
    client, experiment_id = local
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "ckpt.pt").write_bytes(b"weights")
    ref = spool_a_run(tmp_path / "spool", experiment_id, steps=5, artifacts=checkpoint)
    checkpoint.joinpath("ckpt.pt").unlink()  # the spool kept its own copy of the temporary directory

    result = replay_root(client, tmp_path / "spool", AWAY)
    assert result.outage is None and list(result.replayed) == [ref]
    run = client.get_run(resolve_run_id(client, experiment_id, ref))
    assert run.info.status == "FINISHED" and run.data.tags[SPOOL_ID_TAG] == ref
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5]
    assert run.data.tags["last_step"] == "5"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"sample.txt", "checkpoint"}
    assert run_dirs(tmp_path / "spool") == []


def test_a_replay_cut_by_an_outage_resumes_without_duplicate_points(tmp_path, local, monkeypatch):
    client, experiment_id = local
    ref = spool_a_run(tmp_path / "spool", experiment_id, steps=20)
    log_batch, calls = MlflowClient.log_batch, []

    def away_after_the_first(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise MlflowException(f"API request to {AWAY} failed with exception ConnectionError")
        return log_batch(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", away_after_the_first)
    cut = replay_root(client, tmp_path / "spool", AWAY)
    assert cut.outage is not None and not cut.replayed
    (path,) = run_dirs(tmp_path / "spool")
    assert json.loads((path / "progress.json").read_text())["applied"] >= 2  # the run and its first points

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    assert list(replay_root(client, tmp_path / "spool", AWAY).replayed) == [ref]
    run_id = resolve_run_id(client, experiment_id, ref)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 21))
    assert len(client.search_runs([experiment_id])) == 1  # the run was not created twice


def test_a_run_whose_writer_died_is_replayed_and_ended_killed(tmp_path, local):
    client, experiment_id = local
    script = (f"import os, sys; sys.path.insert(0, {str(PROJECT_ROOT)!r})\n"
              "from mlflow.entities import Metric\n"
              "from study.spool import SpoolingClient\n"
              f"client = SpoolingClient({AWAY!r}, {str(tmp_path / 'spool')!r}, offline=True)\n"
              f"run = client.create_run_id({experiment_id!r}, 'trial-000', {{'optuna_state': 'RUNNING'}})\n"
              "client.log_batch(run, metrics=[Metric('val_loss', 2.5, 0, 10)])\n"
              "print(run, flush=True)\n"
              "os._exit(9)\n")  # dies mid-trial, its run never ended
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert died.returncode == 9, died.stderr
    ref = died.stdout.strip()

    assert list(replay_root(client, tmp_path / "spool", AWAY, log=lambda *a, **k: None).replayed) == [ref]
    run = client.get_run(resolve_run_id(client, experiment_id, ref))
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna_state"] == "FAIL" and run.data.tags["failure_reason"] == WORKER_DIED
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")] == [2.5]


def test_a_spool_for_another_server_is_left_alone(tmp_path, local):
    client, experiment_id = local
    spool_a_run(tmp_path / "spool", experiment_id, steps=1)
    result = replay_root(client, tmp_path / "spool", "http://elsewhere:5000")
    assert not result.replayed and len(run_dirs(tmp_path / "spool")) == 1


def test_a_torn_last_line_is_dropped_but_a_torn_middle_line_is_refused(tmp_path, local):
    client, experiment_id = local
    ref = spool_a_run(tmp_path / "spool", experiment_id, steps=2)
    (path,) = run_dirs(tmp_path / "spool")
    ops = path / "ops.jsonl"
    ops.write_text(ops.read_text() + '{"op": "log_ba')  # a crash in the middle of a write
    assert list(replay_root(client, tmp_path / "spool", AWAY).replayed) == [ref]
    assert run_dirs(tmp_path / "spool") == []

    spool_a_run(tmp_path / "spool", experiment_id, steps=2)
    (path,) = run_dirs(tmp_path / "spool")
    lines = (path / "ops.jsonl").read_text().splitlines()
    (path / "ops.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(SpoolError, match="line 2 is not JSON"):
        replay_root(client, tmp_path / "spool", AWAY)
