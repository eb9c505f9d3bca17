"""Losing the MLflow tracking server during a study: training goes on, runs wait in the spool, replays restore them."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from model.data import PROJECT_ROOT
from study.errors import WORKER_DIED as DIED
from study.spool import SpoolingClient, sync
from study.spool import client as spool
from study.spool.replay import resolve_run_id
from study.tracking import TrialRun
from study_helpers import SYSTEM_METRICS, MlflowServer, child_runs, load_study, parent_runs, run_study

SYNC = [sys.executable, str(PROJECT_ROOT / "study" / "sync.py")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real server for the module; each test uses its own experiment and leaves the server running."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


def stop_server_at_first_eval(monkeypatch, server: MlflowServer) -> None:
    """The server goes away while trial 0 trains: its run exists, the rest of its writes find nobody."""
    on_eval, stopped = TrialRun.on_eval, []

    def stopping(self, step, metrics):
        if not stopped:
            stopped.append(step)
            server.stop()
        on_eval(self, step, metrics)

    monkeypatch.setattr(TrialRun, "on_eval", stopping)


def study_runs(client: MlflowClient, study) -> dict:
    """The study's child runs by trial number, found from the trials' mlflow_run_id as the reports find them."""
    experiment_id = client.get_experiment_by_name(study.study_name).experiment_id
    return {t.number: client.get_run(resolve_run_id(client, experiment_id, t.user_attrs["mlflow_run_id"]))
            for t in study.trials}


def assert_each_trial_fully_tracked(client: MlflowClient, study) -> None:
    runs, name = study_runs(client, study), study.study_name
    assert len(child_runs(client, name)) == len(study.trials)  # no run twice
    for t in study.trials:
        run = runs[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["optuna_state"] == t.state.name
        last = t.user_attrs["pruned_at_step"] if t.state == TrialState.PRUNED else t.params["max_iters"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == list(range(10, last + 1, 10))
        assert SYSTEM_METRICS <= run.data.metrics.keys()
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "loss_curves.csv" in files
        assert ("sample.txt" in files) == (t.state == TrialState.COMPLETE)
        assert ("checkpoint" in files) == bool(t.user_attrs.get("checkpoint"))


def test_a_server_lost_mid_study_costs_no_trial_and_sync_restores_every_run(workdir, corpus_file, server,
                                                                            monkeypatch, capsys):
    stop_server_at_first_eval(monkeypatch, server)
    assert run_study("--trials", "3", "--data", corpus_file, "--sample-tokens", "20", "--study-name", "lost",
                     "--tracking-uri", server.url) == 0
    study = load_study(workdir, "lost")
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert all(t.duration.total_seconds() < 60 for t in study.trials)  # MLflow's retries alone took ~9 minutes
    err = capsys.readouterr().err
    assert f"tracking: MLflow server at {server.url} unreachable" in err
    assert "runs stay spooled in" in err and "study/sync.py" in err

    server.start()
    synced = subprocess.run([*SYNC, "--tracking-uri", server.url], capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0, synced.stderr
    assert f"runs replayed to {server.url}" in synced.stdout and "left" not in synced.stdout, synced.stdout
    assert not list((workdir / "mlflow-spool").iterdir())

    client = MlflowClient(server.url)
    assert_each_trial_fully_tracked(client, study)
    (parent,) = parent_runs(client, "lost")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(study.best_value)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"best_checkpoint", "study_summary.json"}
    version = client.get_model_version_by_alias("lost", "best")
    assert version.run_id == study_runs(client, study)[study.best_trial.number].info.run_id

    again = subprocess.run([*SYNC, "--tracking-uri", server.url], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to replay" in again.stdout
    assert len(child_runs(client, "lost")) == len(study.trials)


def test_a_server_back_during_the_study_is_caught_up_by_the_study_itself(workdir, corpus_file, server,
                                                                         monkeypatch, capsys):
    monkeypatch.setattr(spool, "PROBE_INTERVAL_S", 0.0)  # probe at every write while behind
    stop_server_at_first_eval(monkeypatch, server)
    end = TrialRun.end

    def restarting(self, *args, **kwargs):  # back once trial 1 has ended, spooled
        end(self, *args, **kwargs)
        if not server.running and self.run_id.startswith("spool-"):
            server.start()

    monkeypatch.setattr(TrialRun, "end", restarting)
    assert run_study("--trials", "3", "--pruner", "none", "--data", corpus_file, "--sample-tokens", "20",
                     "--study-name", "back", "--tracking-uri", server.url) == 0
    err = capsys.readouterr().err
    assert "unreachable" in err and f"tracking: caught up, 2 runs replayed to {server.url}" in err
    assert not list((workdir / "mlflow-spool").iterdir())
    client = MlflowClient(server.url)
    assert_each_trial_fully_tracked(client, load_study(workdir, "back"))
    assert parent_runs(client, "back")[0].info.status == "FINISHED"


def spool_a_run(url: str, spool_dir, experiment_id: str, steps: int) -> str:
    """A run written while the server is away: created, `steps` loss points (each its own request), ended."""
    client = SpoolingClient(url, str(spool_dir), offline=True)
    client.experiment_id = experiment_id
    run = client.create_run_id(experiment_id, "trial-000", {"optuna_state": "RUNNING"})
    for step in range(1, steps + 1):
        client.log_batch(run, metrics=[Metric("loss", 1 / step, 0, step)], tags=[RunTag("last_step", str(step))])
    client.set_terminated(run, "FINISHED")
    return run


@pytest.mark.slow  # its replay logic runs serverless in test_spool_offline.py
def test_a_replay_interrupted_half_way_resumes_without_duplicate_points(workdir, server, monkeypatch, capsys):
    monkeypatch.setattr(spool, "PROBE_INTERVAL_S", 1e9)
    experiment_id = MlflowClient(server.url).create_experiment("interrupted")
    ref = spool_a_run(server.url, workdir / "mlflow-spool", experiment_id, steps=20)
    log_batch, calls = MlflowClient.log_batch, []

    def failing_after_eight(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 8:
            raise MlflowException(f"API request to {server.url} failed with exception ConnectionError")
        return log_batch(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", failing_after_eight)
    assert sync.main(["--tracking-uri", server.url]) == 1
    assert "went away during the replay" in capsys.readouterr().err
    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    assert sync.main(["--tracking-uri", server.url]) == 0

    client = MlflowClient(server.url)
    run = client.get_run(resolve_run_id(client, experiment_id, ref))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 21))
    assert run.info.status == "FINISHED" and run.data.tags["last_step"] == "20"
    assert not list((workdir / "mlflow-spool").iterdir())


@pytest.mark.slow  # its replay logic runs serverless in test_spool_offline.py
def test_a_run_whose_writer_died_is_replayed_and_ended_killed(workdir, server):
    experiment_id = MlflowClient(server.url).create_experiment("abandoned")
    script = (f"import os, sys; sys.path.insert(0, {str(PROJECT_ROOT)!r})\n"
              "from mlflow.entities import Metric\n"
              "from study.spool import client as spool\n"
              "spool.PROBE_INTERVAL_S = 1e9\n"
              f"client = spool.SpoolingClient({server.url!r}, 'mlflow-spool', offline=True)\n"
              f"run = client.create_run_id({experiment_id!r}, 'trial-000', {{'optuna_state': 'RUNNING'}})\n"
              "client.log_batch(run, metrics=[Metric('val_loss', 2.5, 0, 10)])\n"
              "print(run, flush=True)\n"
              "os.kill(os.getpid(), 9)\n")  # dies mid-trial, its run never ended
    died = subprocess.run([sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert died.returncode == -signal.SIGKILL, died.stderr
    ref = died.stdout.strip()

    synced = subprocess.run(SYNC, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0, synced.stderr
    client = MlflowClient(server.url)
    run = client.get_run(resolve_run_id(client, experiment_id, ref))
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna_state"] == "FAIL" and run.data.tags["failure_reason"] == DIED
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")] == [2.5]
    assert not list((workdir / "mlflow-spool").iterdir())


def test_sync_refuses_a_missing_spool_and_another_server_in_one_line(workdir, monkeypatch, capsys):
    def sync_exit(*argv: str) -> int:
        try:
            return sync.main(list(argv))
        except SystemExit as exc:
            return exc.code

    assert sync_exit("--spool-dir", str(workdir / "nowhere")) == 2
    assert capsys.readouterr().err.strip().splitlines() == \
        [f"{sync.PROG}: error: --spool-dir {workdir / 'nowhere'}: no such directory"]

    monkeypatch.setattr(spool, "PROBE_INTERVAL_S", 1e9)
    spool_a_run("http://127.0.0.1:9", workdir / "mlflow-spool", "0", steps=1)
    assert sync_exit("--tracking-uri", "http://mlflow.example:5000") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("holds runs for http://127.0.0.1:9 only")

    assert sync_exit() == 1  # the server the spool names is not there: the runs stay
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "MLflow server at http://127.0.0.1:9 unreachable; 1 runs stay spooled" in line
    assert len(list((workdir / "mlflow-spool").iterdir())) == 1
