"""Parallel workers, shared stores and crash recovery, with real processes and real servers on loopback."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from model.config import TrainConfig
from study.recovery import STALE_ATTR
from study_helpers import (
    POSTGRES,
    assert_counts_match,
    child_runs,
    env_without_tracking,
    fresh_postgres_database,
    holding,
    load_study,
    needs_postgres,
    parent_runs,
    rdb_storage,
    run_study,
    start_mlflow_server,
    study_cmd,
    wait_for_held_trials,
)


def test_two_workers_share_one_journal_study(workdir, corpus_file):
    assert run_study("--trials", "5", "--workers", "2", "--data", corpus_file, "--pruner", "none") == 0
    study = load_study(workdir)
    assert_counts_match(study, MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}"), 5)
    assert {t.user_attrs["worker_index"] for t in study.trials} == {0, 1}
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (parent,) = parent_runs(client, "smoke-verse")
    assert "best_checkpoint" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1


def test_a_trial_trains_the_same_alone_or_beside_other_workers(workdir, corpus_file, tmp_path):
    """Workers share a device, never a trial's settings or seeds: one configuration gives one result."""
    from study.bench_workers import pinned_space

    space = tmp_path / "pinned.yaml"
    space.write_text(pinned_space("smoke"))
    for name, workers in (("alone", "1"), ("together", "2")):
        proc = subprocess.run(study_cmd(corpus_file, "--study-name", name, "--trials", workers, "--workers", workers,
                                        "--threads", "1", "--space", str(space)),
                              cwd=workdir, env=env_without_tracking(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    (alone,) = load_study(workdir, "alone").trials
    together = load_study(workdir, "together").trials
    assert len({t.user_attrs["worker_pid"] for t in together}) == 2
    assert all(t.params == alone.params for t in together)
    assert [t.value for t in together] == [alone.value] * 2


@pytest.mark.slow  # covered in the default run by test_shared_stores' three machines on PostgreSQL
def test_fresh_stores_touched_by_three_processes_at_once(workdir, corpus_file):
    procs = [subprocess.Popen(study_cmd(corpus_file, "--trials", "1"), cwd=workdir, env=env_without_tracking(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    study = load_study(workdir)
    assert_counts_match(study, MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}"), 3)
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1


def kill_a_held_trial(hold_dir, study_loader, alive) -> int:
    """SIGKILL the process running the held trial (tests/hold), certainly inside training; returns its number."""
    (pid,) = wait_for_held_trials(hold_dir, 1, alive)
    (trial,) = [t for t in study_loader().get_trials(states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker_pid") == pid]
    os.kill(pid, signal.SIGKILL)
    return trial.number


def assert_recovered(study: optuna.Study, client: MlflowClient, killed: int, finished: int) -> None:
    trials = study.trials
    stale = trials[killed]
    assert stale.state == TrialState.FAIL
    assert not any(t.state == TrialState.RUNNING for t in trials)
    retried = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == stale.params
    done = [t for t in trials if t.state.is_finished() and not t.user_attrs.get(STALE_ATTR)
            and t.number != killed]
    assert len(done) == finished
    run = client.get_run(stale.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna_state"] == "FAIL"
    assert not [c for c in child_runs(client, study.study_name) if c.info.status == "RUNNING"]


def test_sigkilled_journal_worker_is_replaced_and_its_trial_requeued(workdir, corpus_file, tmp_path):
    hold = tmp_path / "hold"
    launcher = subprocess.Popen(study_cmd(corpus_file, "--trials", "4", "--workers", "2"), cwd=workdir,
                                env=holding(env_without_tracking(), hold, trials=1), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    killed = kill_a_held_trial(hold, lambda: load_study(workdir), alive=lambda: launcher.poll() is None)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out
    assert f"trials [{killed}] failed and re-queued" in out
    assert_recovered(load_study(workdir), MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}"), killed, finished=4)


@pytest.mark.slow  # covered in the default run by test_shared_stores' PostgreSQL and MLflow-server tests
@needs_postgres
def test_workers_on_postgres_and_an_mlflow_server_backed_by_postgres(tmp_path, corpus_file):
    optuna_db, mlflow_db = fresh_postgres_database(POSTGRES), fresh_postgres_database(POSTGRES)
    optuna_db = optuna_db.replace("postgres@", "postgres:s3cret-pw@")  # the test server trusts loopback
    work = tmp_path / "work"
    work.mkdir()
    with start_mlflow_server(tmp_path / "server", backend_uri=mlflow_db) as url:
        proc = subprocess.run(study_cmd(corpus_file, "--trials", "6", "--workers", "3", "--storage", optuna_db,
                                        "--tracking-uri", url), cwd=work, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        study = optuna.load_study(study_name="smoke-verse", storage=rdb_storage(optuna_db))
        client = MlflowClient(url)
        assert_counts_match(study, client, 6)
        (parent,) = parent_runs(client, "smoke-verse")
        assert parent.data.params["storage"].startswith("postgresql://postgres:***@")
    assert "s3cret-pw" not in proc.stdout + proc.stderr and "***" in proc.stdout
    assert list(work.iterdir()) == []  # nothing local: both stores are servers


@needs_postgres
def test_sigkilled_worker_on_postgres_is_failed_and_requeued_by_a_living_one(tmp_path, corpus_file):
    url = fresh_postgres_database(POSTGRES)
    work, hold = tmp_path / "work", tmp_path / "hold"
    work.mkdir()
    args = ("--trials", "3", "--storage", url, "--heartbeat-interval", "1")
    storage = rdb_storage(url)
    procs = [subprocess.Popen(study_cmd(corpus_file, *args), cwd=work, env=holding(env_without_tracking(), hold, 1),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    victim_trial = kill_a_held_trial(hold, lambda: optuna.load_study(study_name="smoke-verse", storage=storage),
                                     alive=lambda: all(p.poll() is None for p in procs))
    # the killed process may be either; the survivor goes on and picks up the re-queued trial
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [-signal.SIGKILL, 0], outs
    # whatever the survivor did not pick up, the next run of the study does
    rerun = subprocess.run(study_cmd(corpus_file, *args[:1], "1", *args[2:]), cwd=work, env=env_without_tracking(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    study = optuna.load_study(study_name="smoke-verse", storage=storage)
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    finished = sum(1 for t in study.trials if t.state.is_finished() and t.number != victim_trial)
    assert_recovered(study, client, victim_trial, finished=finished)


def test_heartbeat_stale_trial_is_closed_in_mlflow_and_requeued(workdir, corpus_file, tmp_path):
    """A trial whose worker stopped beating (on another machine: no pid to check) is failed by the heartbeat."""
    from model.config import TrainConfig
    from study.recovery import StaleTrialHandler
    from study.storage import make_storage
    from study.tracking import StudyTracker

    handler = StaleTrialHandler()
    storage = make_storage(f"sqlite:///{tmp_path / 'rdb.db'}", heartbeat_interval=1, stale_callback=handler)
    study = optuna.create_study(study_name="hb", storage=storage)
    tracker = StudyTracker(f"sqlite:///{workdir / 'mlflow.db'}", "hb")
    tracker.open(study, {})
    handler.tracker = tracker
    trial = study.ask()
    trial.suggest_float("learning_rate", 1e-3, 1e-2)
    run = tracker.start_trial(trial, TrainConfig(), False, {})
    trial.set_user_attr("mlflow_run_id", run.run_id)
    storage.record_heartbeat(trial._trial_id)
    time.sleep(3.5)  # past the grace period (2 x interval), at the database clock's one-second resolution
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[1].state == TrialState.WAITING
    assert trials[1].system_attrs["fixed_params"] == trials[0].params
    assert tracker.client.get_run(run.run_id).info.status == "KILLED"
    run.stop_system_metrics()  # its sampler thread would outlive the test


def test_trials_per_gpu_places_k_workers_on_each_gpu(monkeypatch):
    """On a (simulated) 4-GPU machine: K workers per GPU, round-robin; --device cuda:N keeps them all on GPU N."""
    from study.options import parse_options
    from study.settings import worker_count
    from study.workers import worker_env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = parse_options(["--trials-per-gpu", "2"])
    assert worker_count(args, TrainConfig(device="auto")) == 8
    assert worker_count(args, TrainConfig(device="cuda:1")) == 2
    assert [worker_env(i, threads=2)["CUDA_VISIBLE_DEVICES"] for i in range(8)] == list("01230123")
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(5, threads=2, spread_gpus=False)
    assert worker_env(0, threads=2)["TORCHINDUCTOR_COMPILE_THREADS"] == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [worker_env(i, threads=2)["CUDA_VISIBLE_DEVICES"] for i in range(5)] == ["4", "5", "6", "7", "4"]


def test_a_trial_whose_worker_is_still_being_recorded_is_never_taken_for_a_dead_one():
    """Another worker may look at the trial between any two of the writes that record its process."""
    from study.recovery import StaleTrialHandler, mark_worker, recover_dead_workers

    study = optuna.create_study()
    trial = study.ask()
    write = trial.set_user_attr
    recovered = []

    def write_then_look(key, value):
        write(key, value)
        recovered.extend(recover_dead_workers(study, StaleTrialHandler()))

    trial.set_user_attr = write_then_look
    mark_worker(trial)
    assert recovered == []
    assert study.trials[0].state == TrialState.RUNNING


@pytest.mark.parametrize("flags, cores, expected", [
    ([], 2, 2),  # the cpu preset: a one-thread worker per core
    ([], 32, 8),  # at most eight: the sampler still learns from finished trials
    (["--threads", "2"], 4, 2),  # per --threads cores
    (["--workers", "1"], 4, 1),  # trials in the study's own process
    (["--preset", "smoke"], 4, 1),  # trials of a second: not worth a process each
])
def test_the_cpu_preset_starts_a_worker_per_core_unless_told(workdir, corpus_file, monkeypatch, flags, cores,
                                                               expected):
    from study.options import parse_options
    from study.settings import settings_from_options

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    args = parse_options(["--preset", "cpu", "--device", "cpu", "--data", corpus_file, *flags])
    settings, _ = settings_from_options(args)
    assert settings.workers == expected


def _draw_all(pool, counts, index):
    while pool.draw():
        counts[index] += 1
        time.sleep(0.001 * (index + 1))  # one process slower than the other


def test_workers_draw_exactly_the_launchs_trials_between_them():
    import multiprocessing

    from study.workers import TrialPool

    pool = TrialPool(60)
    ctx = multiprocessing.get_context("spawn")
    counts = ctx.Array("i", 2)
    procs = [ctx.Process(target=_draw_all, args=(pool, counts, i)) for i in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)  # each imports torch: slow on a busy machine, never timed
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert sum(counts) == 60 and not pool.draw()
    pool.give_back(1)  # a dead worker's trial, failed and re-queued
    assert pool.draw() and not pool.draw()
