"""The study's MLflow trial runs: system metrics."""
from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from mlflow import MlflowClient

from conftest import tiny_config
from study.tracking import StudyTracker
from study_helpers import SYSTEM_METRICS, system_metrics_monitors


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_trial_shorter_than_one_sampling_interval_still_has_system_metrics(tracking_uri):
    tracker = StudyTracker(tracking_uri, "short")
    tracker.open(optuna.create_study(), {})
    run = tracker.start_trial(SimpleNamespace(number=0), tiny_config(), True, {})
    assert system_metrics_monitors()
    run.end("PRUNED")
    assert not system_metrics_monitors()
    metrics = MlflowClient(tracking_uri).get_run(run.run_id).data.metrics
    assert SYSTEM_METRICS <= metrics.keys()
