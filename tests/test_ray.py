"""A study across a Ray cluster: a head with no CPUs and two 1-CPU nodes on loopback (`ray.cluster_utils.Cluster`),
each trial a Ray task. Never `ray stop` here: it would stop every Ray process on the machine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from study.ray_trials import NODE_ATTR, TASK_ATTR
from study_helpers import (
    POSTGRES,
    ROOT,
    child_runs,
    env_without_tracking,
    fresh_postgres_database,
    holding,
    needs_postgres,
    parent_runs,
    rdb_storage,
    study_cmd,
    wait_for_held_trials,
)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported: every node on loopback
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-hold")


@pytest.fixture(scope="module")
def cluster(hold_dir):
    """Its nodes' processes hold one trial inside training whenever a test frees the ticket (tests/hold)."""
    saved = os.environ.copy()
    os.environ.update(holding({}, hold_dir, trials=1))
    (hold_dir / "held-0").touch()  # no trial is held until a test frees the ticket
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def hold_next_trial(hold_dir) -> None:
    for stale in hold_dir.glob("training-*"):
        stale.unlink()
    (hold_dir / "held-0").unlink()


def ray_study(corpus_file: str, address: str, storage: str, *args: str) -> list[str]:
    return study_cmd(corpus_file, "--ray-address", address, "--storage", storage, *args)


def load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="smoke-verse", storage=rdb_storage(url))


def start_held_study(cluster, hold_dir, tmp_path, corpus_file):
    """A 3-trial study on the cluster, its first trial held inside training; returns its database URL, directory,
    process and the pid of the process training the held trial."""
    url, work = fresh_postgres_database(POSTGRES), tmp_path / "work"
    work.mkdir()
    hold_next_trial(hold_dir)
    proc = subprocess.Popen(ray_study(corpus_file, cluster.address, url, "--trials", "3"), cwd=work,
                            env=env_without_tracking(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (pid,) = wait_for_held_trials(hold_dir, 1, alive=lambda: proc.poll() is None)
    return url, work, proc, pid


def worker_node_ids(cluster) -> set[str]:
    return {n.node_id for n in cluster.worker_nodes}


@pytest.mark.slow  # the default run's node-loss study runs its trials through the cluster too
@needs_postgres
def test_a_study_runs_each_trial_as_a_task_on_the_worker_nodes(cluster, tmp_path, corpus_file):
    url, work = fresh_postgres_database(POSTGRES), tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(ray_study(corpus_file, cluster.address, url, "--trials", "4"), cwd=work,
                          env=env_without_tracking(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Ray cluster: 3 nodes, 2 CPUs" in proc.stdout and "at most 2 at once" in proc.stdout
    study = load(url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert {t.user_attrs[NODE_ATTR] for t in study.trials} <= worker_node_ids(cluster)  # none on the head
    assert len({t.user_attrs[TASK_ATTR] for t in study.trials}) == 4
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    assert len(parent_runs(client, "smoke-verse")) == 1
    assert sorted(int(r.data.tags["trial_number"]) for r in child_runs(client, "smoke-verse")) == [0, 1, 2, 3]


@needs_postgres
def test_a_node_lost_mid_trial_fails_its_trial_naming_the_node_and_the_study_goes_on(cluster, hold_dir, tmp_path,
                                                                                    corpus_file):
    url, work, proc, pid = start_held_study(cluster, hold_dir, tmp_path, corpus_file)
    (held,) = [t for t in load(url).get_trials(states=(TrialState.RUNNING,)) if t.user_attrs["worker_pid"] == pid]
    (node,) = [n for n in cluster.worker_nodes if n.node_id == held.user_attrs[NODE_ATTR]]
    lost_at = time.time()
    cluster.remove_node(node, allow_graceful=False)  # killed, not drained
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        cluster.add_node(num_cpus=1)  # the next tests find two nodes again
    assert proc.returncode == 0, out
    assert f"trials [{held.number}] failed and re-queued" in out
    trials = load(url).trials
    lost = trials[held.number]
    assert lost.state == TrialState.FAIL
    assert lost.user_attrs["fail_reason"] == f"Ray node {node.node_id} died during the trial"
    (retried,) = [t for t in trials if t.user_attrs.get("retry_of") == held.number]
    assert retried.state == TrialState.COMPLETE and retried.params == lost.params
    print(f"lost trial failed and re-queued {lost.datetime_complete.timestamp() - lost_at:.1f} s after its node was "
          f"removed; its retry started after {retried.datetime_start.timestamp() - lost_at:.1f} s")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 3  # exactly --trials, the retry among them
    assert {t.user_attrs[NODE_ATTR] for t in trials} <= worker_node_ids(cluster) | {node.node_id}  # not the head
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(lost.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == lost.user_attrs["fail_reason"]


@pytest.mark.slow  # the stop's logic is the local study's (test_stopping.py); this is its Ray channel
@needs_postgres
def test_sigterm_to_the_driver_stops_every_task(cluster, hold_dir, tmp_path, corpus_file):
    url, work, proc, pid = start_held_study(cluster, hold_dir, tmp_path, corpus_file)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, out
    trials = load(url).trials
    (held,) = [t for t in trials if t.user_attrs["worker_pid"] == pid]
    assert held.state == TrialState.FAIL and held.user_attrs["fail_reason"] == "interrupted"
    # the trials running at the signal were interrupted, those done before it kept; nothing left RUNNING
    assert {t.user_attrs.get("fail_reason") for t in trials if t.state != TrialState.COMPLETE} == {"interrupted"}
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    assert [p.info.status for p in parent_runs(client, "smoke-verse")] == ["KILLED"]
    assert not [r for r in child_runs(client, "smoke-verse") if r.info.status == "RUNNING"]


@pytest.mark.parametrize("args, message", [
    (("--ray-address", "127.0.0.1:1"), "--ray-address 127.0.0.1:1: unreachable"),
    (("--ray-address", "CLUSTER"), "a file store cannot be shared by the 3 nodes of a Ray cluster"),
    (("--ray-address", "CLUSTER", "--device", "cuda:0"), "--device cuda:0 with --ray-address"),
])
def test_what_a_cluster_cannot_run_is_refused_before_anything_is_created(cluster, tmp_path, corpus_file, args,
                                                                         message):
    work = tmp_path / "work"
    work.mkdir()
    args = [cluster.address if a == "CLUSTER" else a for a in args]
    proc = subprocess.run(study_cmd(corpus_file, *args), cwd=work, env=env_without_tracking(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert message in line
    assert list(work.iterdir()) == []


def test_trials_per_gpu_splits_each_gpu_between_tasks(tmp_path):
    """Logical GPUs: with --trials-per-gpu 2 a trial asks for half a GPU, and Ray shows each task one GPU."""
    from model.sample import SampleSpec
    from study.ray_trials import resources
    from study.settings import StudySettings

    settings = StudySettings(study_name="s", preset="gpu", space={}, base=None, data_path="", corpus_sha256="",
                             sample=SampleSpec("A"), objective="loss", sampler="tpe", pruner="asha", seed=1,
                             storage=None, tracking_uri="", trials=4, trials_per_gpu=2)
    assert resources(settings) == {"num_cpus": 1, "num_gpus": 0.5}

    @ray.remote
    def visible() -> str:
        return os.environ["CUDA_VISIBLE_DEVICES"]

    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        seen = ray.get([visible.options(**resources(settings)).remote() for _ in range(4)])
    finally:
        ray.shutdown()
    assert all(ids in ("0", "1") for ids in seen), seen  # each task one GPU of the two, never both


@pytest.mark.slow  # a tracking server, a database and the cluster: minutes on 2 cores
@needs_postgres
def test_runs_spooled_on_a_node_during_an_outage_reach_mlflow_once_the_server_is_back(cluster, hold_dir, tmp_path,
                                                                                       corpus_file):
    from study_helpers import MlflowServer

    url, work = fresh_postgres_database(POSTGRES), tmp_path / "work"
    work.mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    hold_next_trial(hold_dir)
    try:
        proc = subprocess.Popen(ray_study(corpus_file, cluster.address, url, "--trials", "2", "--workers", "1",
                                          "--tracking-uri", server.url), cwd=work, env=env_without_tracking(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_held_trials(hold_dir, 1, alive=lambda: proc.poll() is None)
        server.stop()  # the held trial's remaining writes, and the next trial's, find nobody
        (hold_dir / "release").touch()
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        assert "runs spooled on the nodes while the tracking server was away" in out
        assert list((work / "mlflow-spool").iterdir())  # kept by the driver, not left on a node
        server.start()
        synced = subprocess.run([sys.executable, str(ROOT / "study" / "sync.py")], cwd=work, capture_output=True,
                                text=True, timeout=300)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        client = MlflowClient(server.url)
        runs = child_runs(client, "smoke-verse")
        assert sorted(int(r.data.tags["trial_number"]) for r in runs) == [0, 1]
        assert {r.info.status for r in runs} == {"FINISHED"}
    finally:
        (hold_dir / "release").unlink(missing_ok=True)
        server.stop()
