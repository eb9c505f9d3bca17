"""Read a study back: its Optuna trials, their MLflow runs, loss curves and samples."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
from mlflow import MlflowClient
from optuna.trial import FrozenTrial

from study.errors import redact
from study.spool.replay import resolve_run_id
from study.storage import DEFAULT_JOURNAL, make_storage
from study.summary import baseline_trial, best_trial, completed_trials, trials_table
from study.tracking import PARENT_RUN_ATTR


class ReportError(ValueError):
    """A study that cannot be reported on; the message names the store or the study."""


@dataclass
class StudyData:
    study: optuna.Study
    client: MlflowClient
    parent_run_id: str | None
    trials: pd.DataFrame  # one row per trial, every state

    @property
    def multi_objective(self) -> bool:
        return len(self.study.directions) > 1

    def completed(self) -> list[FrozenTrial]:
        return completed_trials(self.study)

    def baseline(self) -> FrozenTrial | None:
        return baseline_trial(self.study)

    def best(self) -> FrozenTrial | None:
        return best_trial(self.study)

    def run_id(self, trial: FrozenTrial) -> str | None:
        """The trial's MLflow run; a run spooled while the server was away is found by its local id."""
        ref = trial.user_attrs.get("mlflow_run_id")
        if not ref:
            return None
        experiment = self.client.get_experiment_by_name(self.study.study_name)
        return resolve_run_id(self.client, experiment and experiment.experiment_id, ref)

    def pareto(self) -> list[FrozenTrial]:
        return sorted(self.study.best_trials, key=lambda t: t.values[0]) if self.multi_objective else []


def open_study(study_name: str, storage: str | None) -> optuna.Study:
    """Load an existing study without creating any store: a missing file or unknown name is an error."""
    if storage is None or "://" not in storage:
        path = Path(storage or DEFAULT_JOURNAL)
        if not path.is_file():
            raise ReportError(f"no Optuna journal at {path}: run from the study's directory or pass --storage")
    elif storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise ReportError(f"--storage {storage}: no such database file")
    store = make_storage(storage)
    names = optuna.get_all_study_names(store)
    if study_name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise ReportError(f"no study named {study_name!r} in {redact(storage or DEFAULT_JOURNAL)} (studies: {known})")
    return optuna.load_study(study_name=study_name, storage=store)


def open_tracking(tracking_uri: str) -> MlflowClient:
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ReportError(f"no MLflow database at {tracking_uri.removeprefix('sqlite:///')}: "
                          "run from the study's directory or pass --tracking-uri")
    return MlflowClient(tracking_uri)


def load(study_name: str, storage: str | None, tracking_uri: str) -> StudyData:
    study = open_study(study_name, storage)
    if not study.trials:
        raise ReportError(f"study {study_name!r} has no trials yet")
    client = open_tracking(tracking_uri)
    return StudyData(study, client, study.user_attrs.get(PARENT_RUN_ATTR), trials_table(study))


def loss_curves(client: MlflowClient, run_id: str) -> pd.DataFrame:
    """Train and val loss by step, as logged at each eval."""
    frames = [pd.DataFrame([(m.step, m.value) for m in client.get_metric_history(run_id, key)],
                           columns=["step", key]).set_index("step") for key in ("train_loss", "val_loss")]
    return pd.concat(frames, axis=1).sort_index().reset_index()


def run_text(client: MlflowClient, run_id: str, artifact: str, tmp: Path) -> str | None:
    try:
        return Path(client.download_artifacts(run_id, artifact, str(tmp))).read_text(encoding="utf-8")
    except Exception:  # the run may have no such artifact (a failed or pruned trial)
        return None


def run_params(client: MlflowClient, run_id: str) -> dict:
    return client.get_run(run_id).data.params
