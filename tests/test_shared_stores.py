"""Many machines on one study: a fresh start by several workers at once, connection limits, a database restart.

Workers on different machines share only the stores, so each is started here from its own working directory.
"""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from study.storage import APPLICATION_NAME, POOL_OVERFLOW, POOL_SIZE, make_storage, setup_lock
from study_helpers import (
    POSTGRES,
    PostgresServer,
    assert_counts_match,
    child_runs,
    connections_by_process,
    env_without_tracking,
    fresh_postgres_database,
    holding,
    needs_postgres,
    parent_runs,
    rdb_storage,
    start_mlflow_server,
    study_cmd,
    wait_for_held_trials,
)

WAITING = "waiting for another process setting up a study"


def wait_for(predicate, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def shared_stores(request, tmp_path):
    """Fresh stores every 'machine' shares: a journal and an SQLite file on a shared disk, or PostgreSQL databases
    behind an `mlflow server`."""
    if request.param == "files":
        shared = tmp_path / "shared"
        shared.mkdir()
        yield str(shared / "optuna.journal"), f"sqlite:///{shared / 'mlflow.db'}"
        return
    if not POSTGRES:
        pytest.skip("set CHARGPT_TEST_POSTGRES to a PostgreSQL URL (.ci/run does)")
    optuna_db, mlflow_db = fresh_postgres_database(POSTGRES), fresh_postgres_database(POSTGRES)
    with start_mlflow_server(tmp_path / "server", backend_uri=mlflow_db) as url:
        yield optuna_db, url


# on files, three processes of one machine: the lock is the same flock the default run's journal tests take
@pytest.mark.parametrize("shared_stores", [pytest.param("files", marks=pytest.mark.slow), "postgres"], indirect=True)
def test_workers_from_three_machines_starting_one_fresh_study_at_once_make_one_study(shared_stores, tmp_path,
                                                                                      corpus_file):
    storage, tracking = shared_stores
    machines = [tmp_path / f"machine-{i}" for i in range(3)]
    with setup_lock(storage):  # every worker reaches the set-up while it is held, then all go at once
        procs = []
        for work in machines:
            work.mkdir()
            log = open(work / "console.txt", "w")
            procs.append(subprocess.Popen(study_cmd(corpus_file, "--trials", "1", "--storage", storage,
                                                    "--tracking-uri", tracking), cwd=work, env=env_without_tracking(),
                                          stdout=log, stderr=subprocess.STDOUT, text=True))
        wait_for(lambda: all(WAITING in (w / "console.txt").read_text() for w in machines),
                 "every worker to wait for the set-up lock")
    for proc, work in zip(procs, machines):
        assert proc.wait(timeout=300) == 0, (work / "console.txt").read_text()
    study = optuna.load_study(study_name="smoke-verse", storage=rdb_storage(storage) if "://" in storage
                              else make_storage(storage))
    client = MlflowClient(tracking)
    assert_counts_match(study, client, 3)  # one parent run, every trial's run under it
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["smoke-verse"]
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


@needs_postgres
def test_eight_workers_each_hold_at_most_two_database_connections_and_their_launcher_three(tmp_path, corpus_file):
    optuna_db, mlflow_db = fresh_postgres_database(POSTGRES), fresh_postgres_database(POSTGRES)
    most: dict[str, int] = {}
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            for name, count in connections_by_process(POSTGRES, APPLICATION_NAME).items():
                most[name] = max(most.get(name, 0), count)
            time.sleep(0.1)

    work = tmp_path / "work"
    work.mkdir()
    with start_mlflow_server(tmp_path / "server", backend_uri=mlflow_db) as url:
        watcher = threading.Thread(target=watch)
        watcher.start()
        launcher = subprocess.Popen(study_cmd(corpus_file, "--trials", "8", "--workers", "8", "--storage", optuna_db,
                                              "--tracking-uri", url), cwd=work, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = launcher.communicate(timeout=600)
        finally:
            running.clear()
            watcher.join()
        assert launcher.returncode == 0, out
        assert "too many clients" not in out
        assert_counts_match(optuna.load_study(study_name="smoke-verse", storage=rdb_storage(optuna_db)),
                            MlflowClient(url), 8)
    assert len(most) >= 9, most  # the launcher and its 8 workers were seen connected
    launcher_most = most.pop(f"{APPLICATION_NAME}:{launcher.pid}")
    assert launcher_most <= POOL_SIZE + POOL_OVERFLOW + 1 == 3, most  # + the set-up lock's, while it sets up
    assert max(most.values()) <= POOL_SIZE + POOL_OVERFLOW == 2, most


def test_a_postgresql_restart_in_the_middle_of_a_trial_is_survived(tmp_path, corpus_file):
    server = PostgresServer()
    try:
        server.start()
        work, hold = tmp_path / "work", tmp_path / "hold"
        work.mkdir()
        log = open(work / "console.txt", "w")
        proc = subprocess.Popen(study_cmd(corpus_file, "--trials", "2", "--storage", server.url), cwd=work,
                                env=holding(env_without_tracking(), hold, trials=1), stdout=log,
                                stderr=subprocess.STDOUT)
        wait_for_held_trials(hold, 1, alive=lambda: proc.poll() is None)  # the first trial, inside training
        server.stop()
        time.sleep(8)  # the database stays down this long while the trial trains
        server.start()
        restarted = time.time()
        (hold / "release").touch()
        assert proc.wait(timeout=300) == 0, (work / "console.txt").read_text()
        study = optuna.load_study(study_name="smoke-verse", storage=rdb_storage(server.url))
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
        assert study.trials[0].datetime_complete.timestamp() > restarted  # the restart happened inside the trial
        client = MlflowClient(f"sqlite:///{Path(work) / 'mlflow.db'}")
        assert {r.info.status for r in child_runs(client, "smoke-verse")} == {"FINISHED"}
        assert len(parent_runs(client, "smoke-verse")) == 1
    finally:
        server.remove()


@pytest.mark.slow  # the default run restarts the database mid-trial once
def test_a_trial_ending_while_the_database_restarts_waits_for_it_and_is_recorded(tmp_path, corpus_file):
    server = PostgresServer()
    try:
        server.start()
        work = tmp_path / "work"
        work.mkdir()
        log = open(work / "console.txt", "w")
        proc = subprocess.Popen(study_cmd(corpus_file, "--trials", "3", "--storage", server.url), cwd=work,
                                env=env_without_tracking(), stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: "trial   0 COMPLETE" in (work / "console.txt").read_text() or proc.poll() is not None,
                 "the first trial to end")
        server.stop()  # the next trials (a few seconds each) start and end while it is down
        wait_for(lambda: "storage: database unreachable" in (work / "console.txt").read_text()
                 or proc.poll() is not None, "the study to find the database gone")
        assert proc.poll() is None, (work / "console.txt").read_text()
        server.start()
        assert proc.wait(timeout=300) == 0, (work / "console.txt").read_text()
        assert "storage: database back" in (work / "console.txt").read_text()
        study = optuna.load_study(study_name="smoke-verse", storage=rdb_storage(server.url))
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3, \
            [t.user_attrs.get("fail_reason") for t in study.trials]
    finally:
        server.remove()
