"""Helpers for the study tests: run the CLI in-process and read back both stores."""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from study import run as study_run

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get("CHARGPT_TEST_POSTGRES")
needs_postgres = pytest.mark.skipif(not POSTGRES, reason="set CHARGPT_TEST_POSTGRES to a PostgreSQL URL (.ci/run does)")


def study_cmd(corpus_file: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "study" / "run.py"), "--preset", "smoke", "--device", "cpu",
            "--data", corpus_file, "--pruner", "none", *args]


def env_without_tracking() -> dict:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def assert_counts_match(study: optuna.Study, client: MlflowClient, expected: int) -> None:
    assert len(study.trials) == expected
    assert sorted(t.number for t in study.trials) == list(range(expected))
    (parent,) = parent_runs(client, study.study_name)
    children = child_runs(client, study.study_name)
    assert len(children) == expected
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == list(range(expected))


def run_study(*args: str) -> int:
    """The study CLI on the smoke preset in the current directory; returns its exit code."""
    try:
        return study_run.main(["--preset", "smoke", "--device", "cpu", *args])
    except SystemExit as exc:
        return exc.code


@functools.cache
def rdb_storage(url: str):
    """One storage per database for the whole test session: a fresh one per poll would hold a connection each until
    the garbage collector gets to it. Make it before starting workers: on a fresh database it creates the schema."""
    from study.storage import make_storage
    return make_storage(url)


def load_study(workdir, name: str = "smoke-verse") -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(workdir / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def _runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def parent_runs(client: MlflowClient, experiment: str):
    return [r for r in _runs(client, experiment) if r.data.tags.get("role") == "study"]


def child_runs(client: MlflowClient, experiment: str):
    return [r for r in _runs(client, experiment) if "mlflow.parentRunId" in r.data.tags]


# Two of the `system/` metrics MLflow's monitor logs on every machine (GPU ones only where there is a GPU).
SYSTEM_METRICS = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}


def system_metrics_monitors() -> list[threading.Thread]:
    """MLflow's system metrics samplers still running in this process."""
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, what: str, timeout: float) -> None:
    """Poll url until it answers; fail the test with the log's tail if proc exits or timeout seconds pass."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"{what} did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)


class MlflowServer:
    """A real `mlflow server` on loopback that a test can stop and start again: same port, same stores."""

    def __init__(self, home: Path, backend_uri: str | None = None):
        home.mkdir(parents=True, exist_ok=True)
        self.home, self.port = home, free_port()
        self.backend_uri = backend_uri or f"sqlite:///{home / 'mlflow.db'}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.home / "server.log", "a") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", self.backend_uri, "--workers", "1"],
                cwd=self.home, stdout=log, stderr=subprocess.STDOUT)  # artifacts in home/mlartifacts
        wait_until_up(self.proc, self.url + "/health", self.home / "server.log", "mlflow server", timeout=120)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None


@contextlib.contextmanager
def start_mlflow_server(home: Path, backend_uri: str | None = None):
    """A real `mlflow server` on loopback (stores under home unless backend_uri is given); yields its URL."""
    server = MlflowServer(home, backend_uri)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


def fresh_postgres_database(admin_url: str) -> str:
    """CREATE a new database on the test server; returns its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url.replace("postgresql://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return admin_url.rsplit("/", 1)[0] + "/" + name


class PostgresServer:
    """A throwaway PostgreSQL cluster on loopback (Debian's binaries) that a test may stop and start again."""

    def __init__(self):
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            pytest.skip("PostgreSQL's binaries are not installed (.ci/run installs them)")
        self.bin = found[-1].parent
        self.data = Path(tempfile.mkdtemp(prefix="chargpt-test-pg-"))  # outside pytest's private tmp: postgres reads it
        self.port = free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.data, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_postgres, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w", "-t", "90",
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.data}", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop()
        shutil.rmtree(self.data, ignore_errors=True)


def connections_by_process(admin_url: str, application: str) -> dict[str, int]:
    """Open connections to the server per application_name starting with `application`."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute("SELECT application_name, count(*) FROM pg_stat_activity "
                            "WHERE application_name LIKE %s GROUP BY 1", (application + "%",)).fetchall()
    return dict(rows)


def holding(env: dict, hold_dir: Path, trials: int) -> dict:
    """env for a study whose first `trials` trials train until stopped (tests/hold/sitecustomize.py)."""
    hold_dir.mkdir(parents=True, exist_ok=True)
    return {**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "hold"), str(ROOT)]),
            "CHARGPT_TEST_HOLD": f"{hold_dir}:{trials}"}


def wait_for_held_trials(hold_dir: Path, trials: int, alive, timeout: float = 300) -> list[int]:
    """The pids training the held trials, once each is past its first eval; fails if alive() turns False first.
    The timeout only guards against a hang: the held trials never end by themselves."""
    deadline = time.time() + timeout
    while True:
        marks = sorted(hold_dir.glob("training-*"))
        marks = [m for m in marks if not m.name.endswith(".tmp")]
        if len(marks) >= trials:
            return [int(m.read_text()) for m in marks]
        if not alive():
            pytest.fail("the study ended before its held trials were training")
        if time.time() > deadline:
            pytest.fail(f"{len(marks)} of {trials} held trials training after {timeout:.0f} s")
        time.sleep(0.1)
