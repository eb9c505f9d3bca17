"""Helpers for the study tests: run the CLI in-process and read back both stores."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
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


def run_study(*args: str) -> int:
    """The study CLI on the smoke preset in the current directory; returns its exit code."""
    try:
        return study_run.main(["--preset", "smoke", "--device", "cpu", *args])
    except SystemExit as exc:
        return exc.code


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
