"""The study's MLflow experiment and trial runs: the experiment kind, system metrics, the link to the UI."""
from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from conftest import tiny_config
from mlflow import MlflowClient

from study.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, StudyTracker
from study_helpers import SYSTEM_METRICS, system_metrics_monitors


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_study_experiment_is_marked_model_training_and_an_older_one_gets_the_mark(tracking_uri):
    client = MlflowClient(tracking_uri)
    client.create_experiment("older")  # a study made before the mark
    client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})  # set in the UI
    for name in ("new", "older", "chosen"):
        StudyTracker(tracking_uri, name).open(optuna.create_study(), {})
    kinds = {name: client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)
             for name in ("new", "older", "chosen")}
    assert kinds == {"new": MODEL_TRAINING, "older": MODEL_TRAINING, "chosen": "genai_development"}


def test_a_trial_shorter_than_one_sampling_interval_still_has_system_metrics(tracking_uri):
    tracker = StudyTracker(tracking_uri, "short")
    tracker.open(optuna.create_study(), {})
    run = tracker.start_trial(SimpleNamespace(number=0), tiny_config(), True, {})
    assert system_metrics_monitors()
    run.end("PRUNED")
    assert not system_metrics_monitors()
    metrics = MlflowClient(tracking_uri).get_run(run.run_id).data.metrics
    assert SYSTEM_METRICS <= metrics.keys()


def test_the_runs_link_points_at_the_tracking_server_or_at_mlflow_ui(tracking_uri):
    local = StudyTracker(tracking_uri, "s")
    local.experiment_id = "7"
    assert local.runs_url() == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    server = StudyTracker("https://user:secret@mlflow.example:8443/", "s")
    server.experiment_id = "7"
    assert server.runs_url() == \
        "https://user:***@mlflow.example:8443/#/experiments/7/runs?workflowType=machine_learning"
