"""The tuned GPT in MLflow's model registry: the best trial's checkpoint as a pyfunc model, alias `best`.

Each trial that improves on the best so far logs its checkpoint as an MLflow model on its run and registers it under
the study's name; the alias `best` moves to it unless a better version holds it (workers finish out of order).
At the end of the study `settle_best_model` points the alias at the best trial that saved a checkpoint.
Everything goes through MlflowClient with explicit ids: no global tracking URI, no active run. While the tracking
server is away both are spooled (study/spool/) and run when the spool is replayed.
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType

from model.checkpoint import CHECKPOINT_FILE
from model.data import PROJECT_ROOT
from model.sample import SampleSpec
from study.errors import describe_error, is_outage
from study.tracking import StudyTracker

ALIAS = "best"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# Generation settings: optional input columns (per row) and params (per request) whose defaults are the study's
# sample settings.
OPTIONS = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "seed": "long"}


def model_signature(sample: SampleSpec) -> ModelSignature:
    """prompt (required) and the optional generation settings in; one generated text per row out."""
    # The optional columns take any type: a long column refuses the NaN that records leaving it out put in their
    # rows, a double column refuses JSON integers. The model casts and checks them; the params carry the types.
    inputs = Schema([ColSpec("string", "prompt"), *(ColSpec(AnyType(), k, required=False) for k in OPTIONS)])
    params = ParamSchema([ParamSpec(k, t, getattr(sample, k)) for k, t in OPTIONS.items()])
    return ModelSignature(inputs, Schema([ColSpec("string")]), params)


def log_model(client: MlflowClient, run_id: str, sample: SampleSpec, tags: dict[str, str]) -> str:
    """Log the run's checkpoint/ckpt.pt as a pyfunc model linked to the run; returns the logged model's id."""
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name="chargpt", source_run_id=run_id, tags=tags,
                                        params=run.data.params)  # the trial's configuration, as Model.log does
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = client.download_artifacts(run_id, f"checkpoint/{CHECKPOINT_FILE}", tmp)
        mlflow.pyfunc.save_model(
            f"{tmp}/model", python_model=str(MODEL_CODE), artifacts={"checkpoint": ckpt},
            code_paths=[str(PROJECT_ROOT / "model")],  # the served model imports the project's `model` package
            mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id),
            signature=model_signature(sample),
            input_example=pd.DataFrame({"prompt": [sample.prompt], "max_new_tokens": [100]}),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"pandas=={pd.__version__}"])
        client.log_model_artifacts(logged.model_id, f"{tmp}/model")
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def register_best_model(tracker: StudyTracker, run_id: str, trial_number: int, best_val_loss: float,
                        sample: SampleSpec) -> str | None:
    """Log and register the trial's checkpoint; alias `best` moves to it unless a better version holds it.

    The registry being unavailable must not fail the trial: a warning, a run tag, and None. With the tracking
    server away it is done when the spool is replayed (None now).
    """
    return tracker.client.call_or_spool(run_id, register_version, study_name=tracker.study_name, run_id=run_id,
                                        trial_number=trial_number, best_val_loss=float(best_val_loss),
                                        sample=asdict(sample))


def register_version(client: MlflowClient, study_name: str, run_id: str, trial_number: int, best_val_loss: float,
                     sample: dict) -> str | None:
    """register_best_model's work, now or at the spool's replay; returns the model version."""
    tags = {"trial_number": str(trial_number), "best_val_loss": repr(best_val_loss), "study_name": study_name}
    try:
        model_id = log_model(client, run_id, SampleSpec(**sample), tags)
        _ensure_registered_model(client, study_name)
        version = client.create_model_version(study_name, f"models:/{model_id}", run_id=run_id, tags=tags,
                                              model_id=model_id).version
        holder = _alias_holder(client, study_name)
        if holder is None or best_val_loss < float(holder.tags.get("best_val_loss", "inf")):
            client.set_registered_model_alias(study_name, ALIAS, version)
        return version
    except Exception as exc:  # noqa: BLE001 - any registry failure is reported, never fatal
        if is_outage(exc):  # the server went away: the spool keeps the registration for later
            raise
        _warn(client, run_id, f"model not registered ({describe_error(exc)})")
        return None


def settle_best_model(tracker: StudyTracker, summary: dict, sample: SampleSpec) -> None:
    """At the study's end, alias `best` goes to the best trial that saved a checkpoint: the registry may have missed
    it (unavailable then), or a worse trial of another worker may have taken the alias in a race."""
    run_id = summary.get("checkpoint_run_id")
    if run_id:
        tracker.client.call_or_spool(tracker.parent_run_id, settle_alias, study_name=tracker.study_name,
                                     parent_run_id=tracker.parent_run_id, run_id=run_id, sample=asdict(sample))


def settle_alias(client: MlflowClient, study_name: str, parent_run_id: str, run_id: str, sample: dict) -> None:
    """settle_best_model's work, now or at the spool's replay."""
    try:
        versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'")  # ids are hex: no quoting
                    if v.name == study_name]
        version = max(versions, key=lambda v: int(v.version)).version if versions else None
        if version is None:
            run = client.get_run(run_id).data
            version = register_version(client, study_name, run_id, int(run.tags["trial_number"]),
                                       run.metrics["best_val_loss"], sample)
        if version is not None:
            client.set_registered_model_alias(study_name, ALIAS, version)
    except Exception as exc:  # noqa: BLE001
        if is_outage(exc):
            raise
        _warn(client, parent_run_id, f"alias {ALIAS!r} not updated ({describe_error(exc)})")


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        try:
            client.create_registered_model(name, tags={"study_name": name})
        except mlflow.exceptions.MlflowException:  # created meanwhile by another worker
            client.get_registered_model(name)


def _alias_holder(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except mlflow.exceptions.MlflowException:  # no alias yet
        return None


def _warn(client: MlflowClient, run_id: str | None, message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
    if run_id:
        try:
            client.set_tag(run_id, "model_registry_warning", message[:5000])
        except Exception:  # noqa: BLE001 - the store itself may be what failed
            pass
