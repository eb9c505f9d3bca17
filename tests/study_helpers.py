"""Helpers for the study tests: run the CLI in-process and read back both stores."""
from __future__ import annotations

import optuna
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from study import run as study_run


def run_study(*args: str) -> int:
    """The study CLI on the smoke preset in the current directory; returns its exit code."""
    try:
        return study_run.main(["--preset", "smoke", *args])
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
