"""MLflow tracking: one experiment and one parent run per study, one nested child run per trial."""
from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from model.data import PROJECT_ROOT
from study.errors import describe_error, health_error, is_outage, now_ms, redact
from study.spool import SpoolingClient

PARENT_RUN_ATTR, EXPERIMENT_ATTR = "mlflow_parent_run_id", "mlflow_experiment_id"
CURVE_METRICS = ("train_loss", "val_loss", "lr", "tokens_per_s")
# The MLflow UI's experiment kind for model training (its other main kind, genai_development, is for LLM apps).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# Seconds between system metric samples (MLflow's default of 10 would miss most of a short trial);
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL_S = 2.0


def resolve_tracking_uri(arg: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else MLflow's default: mlflow.db in the working directory."""
    return arg or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class TrackingError(ValueError):
    """An MLflow tracking URI that cannot be used; the message names it."""


def check_tracking(uri: str) -> None:
    """Reach a tracking server (or the sqlite file's directory) before anything is created."""
    if uri.startswith(("http://", "https://")):
        exc = health_error(uri, timeout=10)
        if exc is not None:
            raise TrackingError(f"--tracking-uri {redact(uri)}: MLflow server unreachable ({exc})")
    elif uri.startswith("sqlite:///"):
        directory = Path(uri.removeprefix("sqlite:///")).parent
        if not directory.is_dir():
            raise TrackingError(f"--tracking-uri {uri}: directory {directory} does not exist")


@functools.cache
def code_version() -> str:
    """The project's git commit (with -dirty for local changes), or 'unknown' outside a checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class _ClientMetricsLogger:
    """Stands in for MLflow's BatchMetricsLogger inside the monitor: each sample is one log_batch of our client."""

    def __init__(self, client: SpoolingClient, run_id: str):
        self.client, self.run_id = client, run_id
        self.data: list = []  # the monitor reports how many metrics wait here: none do

    def record_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def flush(self) -> None:
        pass


class SpoolingSystemMetricsMonitor(SystemMetricsMonitor):
    """MLflow's system metrics monitor (its collectors, thread and publishing) logging through the study's client.

    MLflow's own loop stops for good when get_run fails, and logs through a client of its own: a tracking server
    outage would end the samples. Here samples go on and are spooled like every other write.
    """

    def __init__(self, client: SpoolingClient, run_id: str):
        super().__init__(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=client.tracking_uri)
        self.mlflow_logger = _ClientMetricsLogger(client, run_id)

    def monitor(self) -> None:
        while not self._shutdown_event.is_set():
            self.collect_metrics()
            if self._shutdown_event.wait(self.sampling_interval):
                return  # stop_system_metrics takes the last sample
            try:
                self.publish_metrics(self.aggregate_metrics())
            except Exception as exc:  # a write the server refused: the trial goes on without more samples
                print(f"warning: system metrics stopped for run {self._run_id} ({describe_error(exc)})",
                      file=sys.stderr)
                return


def start_system_metrics(client: SpoolingClient, run_id: str) -> SystemMetricsMonitor | None:
    """MLflow's sampler of CPU, memory, disk, network (and GPU with nvidia-ml-py) logging `system/...` to the run."""
    try:
        monitor = SpoolingSystemMetricsMonitor(client, run_id)
        monitor.start()
        return monitor
    except Exception as exc:  # the trial runs without them
        print(f"warning: no system metrics for run {run_id} ({describe_error(exc)})", file=sys.stderr)
        return None


def stop_system_metrics(monitor: SystemMetricsMonitor | None) -> None:
    """Stop the sampler, then log one last sample: the part of the trial since the last one, or all of a trial
    shorter than one interval (MLflow's loop drops the sample it is taking when stopped)."""
    if monitor is None:
        return
    try:
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as exc:  # the trial's outcome does not depend on it
        print(f"warning: last system metrics sample not logged ({describe_error(exc)})", file=sys.stderr)


class TrialRun:
    """A trial's child run; as a training callback it logs the loss curves as they come."""

    def __init__(self, client: MlflowClient | SpoolingClient, run_id: str,
                 system_metrics: SystemMetricsMonitor | None = None):
        self.client, self.run_id = client, run_id
        self.history: list[dict] = []
        self.system_metrics = system_metrics

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append({"step": step, **metrics})
        ts = now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, metrics[k], ts, step) for k in CURVE_METRICS])

    def on_train_end(self, result) -> None:
        """The rest of the outcome record; val_loss, train_loss and tokens_per_s end their curves already."""
        ts = now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, result.iters)
                                                    for k, v in result.outcome().items() if k not in CURVE_METRICS])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_checkpoint(self, save) -> None:
        """save(dir) writes a checkpoint into dir; it lands under the run's checkpoint/ artifacts."""
        with tempfile.TemporaryDirectory() as tmp:
            save(tmp)
            self.client.log_artifacts(self.run_id, tmp, "checkpoint")

    def stop_system_metrics(self) -> None:
        """Idempotent: end() calls it, and so does the objective however the trial ends."""
        monitor, self.system_metrics = self.system_metrics, None
        stop_system_metrics(monitor)

    def end(self, state: str | None = None, reason: str | None = None, status: str | None = None) -> None:
        """Close the run: the curves as CSV, the Optuna state as a tag, FINISHED only for a trial that completed."""
        self.stop_system_metrics()
        if self.history:
            self.client.log_text(self.run_id, pd.DataFrame(self.history).to_csv(index=False), "loss_curves.csv")
        tags = ([RunTag("optuna_state", state)] if state else []) + \
            ([RunTag("failure_reason", reason[:5000])] if reason else [])
        if tags:
            self.client.log_batch(self.run_id, tags=tags)
        if status is None:
            status = "FAILED" if state == "FAIL" else "FINISHED"
        self.client.set_terminated(self.run_id, status)


class StudyTracker:
    """Owns the study's experiment and parent run; opens a child run for each trial."""

    def __init__(self, tracking_uri: str, study_name: str, spool_dir: str | None = None):
        self.tracking_uri = tracking_uri
        self.client = SpoolingClient(tracking_uri, spool_dir)
        self.study_name = study_name
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None

    def open(self, study, settings: dict) -> str:
        """Create (or find) the experiment and the parent run; a resumed study reopens its parent run."""
        self.experiment_id = self.client.experiment_id = self._experiment_id()
        parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if parent_id and self._run_exists(parent_id):
            self.client.update_run(parent_id, status="RUNNING")
        else:
            parent_id = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                               tags={"study_name": self.study_name, "role": "study"}).info.run_id
            self.client.log_batch(parent_id, params=[Param(k, str(v)) for k, v in settings.items()])
            study.set_user_attr(PARENT_RUN_ATTR, parent_id)
        if study.user_attrs.get(EXPERIMENT_ATTR) != self.experiment_id:
            study.set_user_attr(EXPERIMENT_ATTR, self.experiment_id)
        self.parent_run_id = parent_id
        return parent_id

    def attach(self, study) -> None:
        """Join the experiment and parent run that open() made for the study: a worker creates neither."""
        self.parent_run_id = study.user_attrs[PARENT_RUN_ATTR]
        self.experiment_id = self.client.experiment_id = study.user_attrs.get(EXPERIMENT_ATTR) or \
            self.client.get_run(self.parent_run_id).info.experiment_id

    def _experiment_id(self) -> str:
        """The study's experiment, marked as model training; an older study's experiment gets the mark too."""
        experiment = self.client.get_experiment_by_name(self.study_name)
        if experiment is None:
            try:
                return self.client.create_experiment(self.study_name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
            except Exception:  # created meanwhile by a worker on another machine
                experiment = self.client.get_experiment_by_name(self.study_name)
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind chosen in the UI stays
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id

    def runs_url(self) -> str:
        """The study's runs page in the MLflow UI: the tracking server's, else `mlflow ui`'s default address.

        MLflow 3.17's UI opens experiments in its GenAI mode unless the browser was switched to Model training
        (it does not read the experiment kind yet), so the link asks for that mode.
        """
        base = redact(self.tracking_uri) if self.tracking_uri.startswith(("http://", "https://")) \
            else "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"

    def _run_exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.experiment_id == self.experiment_id
        except Exception:  # MlflowException for an unknown id; the store may also have been reset
            return False

    def start_trial(self, trial, config, baseline: bool, params: dict) -> TrialRun:
        tags = {"mlflow.parentRunId": self.parent_run_id, "trial_number": str(trial.number),
                "baseline": str(baseline), "optuna_state": "RUNNING", "study_name": self.study_name}
        run_id = self.client.create_run_id(self.experiment_id, f"trial-{trial.number:03d}", tags)
        all_params = {**dataclasses.asdict(config), **params}
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in all_params.items()])
        return TrialRun(self.client, run_id, start_system_metrics(self.client, run_id))

    def close_run(self, run_id: str, state: str, reason: str, status: str) -> None:
        """End a trial's run from outside its process (its worker died); a run already ended is left alone."""
        self.client.call_or_spool(run_id, close_if_running, run_id=run_id, state=state, reason=reason, status=status)

    def finish(self, summary: dict, checkpoint_run_id: str | None, status: str = "FINISHED") -> None:
        """End the parent run with the study summary and the best trial's checkpoint."""
        pid = self.parent_run_id
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}
        self.client.log_batch(pid, metrics=[Metric(k, float(v), now_ms(), summary["n_trials"])
                                            for k, v in numbers.items()],
                              tags=[RunTag(f"best.{k}", str(v)) for k, v in summary.get("best_params", {}).items()])
        self.client.log_dict(pid, summary, "study_summary.json")
        if checkpoint_run_id:
            self.client.call_or_spool(pid, copy_checkpoint, from_run_id=checkpoint_run_id, to_run_id=pid)
        self.client.set_terminated(pid, status)


def close_if_running(client: MlflowClient, run_id: str, state: str, reason: str, status: str) -> None:
    """End a run still RUNNING with its Optuna state and why."""
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return
    except Exception as exc:
        if is_outage(exc):
            raise
        return  # unknown run id: nothing to close
    client.log_batch(run_id, tags=[RunTag("optuna_state", state), RunTag("failure_reason", reason)])
    client.set_terminated(run_id, status)


def copy_checkpoint(client: MlflowClient, from_run_id: str, to_run_id: str) -> None:
    """The best trial's checkpoint/ artifacts, copied to the study run's best_checkpoint/."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(from_run_id, "checkpoint", tmp)
            client.log_artifacts(to_run_id, local, "best_checkpoint")
        except Exception as exc:
            if is_outage(exc):
                raise
            # the summary still stands without the checkpoint
            print(f"warning: best trial's checkpoint not copied to the study run ({describe_error(exc)})",
                  file=sys.stderr)
