"""Crash recovery: a trial whose worker died is failed in both stores and its parameters re-queued."""
from __future__ import annotations

import socket

import optuna
import psutil
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from study.errors import WORKER_DIED

HOST_ATTR, PID_ATTR, STARTED_ATTR = "worker_host", "worker_pid", "worker_started"
STALE_ATTR = "stale"  # set on a trial failed because its worker died; re-queued under a new number


def mark_worker(trial: optuna.Trial) -> None:
    """Record which process runs the trial, so a later run can tell whether it is still alive."""
    me = psutil.Process()
    trial.set_user_attr(HOST_ATTR, socket.gethostname())
    trial.set_user_attr(STARTED_ATTR, me.create_time())
    # the pid last: worker_alive judges only trials that have it, and then sees the host and start time too
    trial.set_user_attr(PID_ATTR, me.pid)


def worker_alive(attrs: dict) -> bool | None:
    """False when the recorded process is gone (pid reuse checked by start time); None when unknowable here."""
    if attrs.get(HOST_ATTR) != socket.gethostname() or PID_ATTR not in attrs:
        return None
    try:
        return abs(psutil.Process(attrs[PID_ATTR]).create_time() - attrs.get(STARTED_ATTR, 0.0)) < 1.0
    except psutil.NoSuchProcess:
        return False


class StaleTrialHandler:
    """Closes a dead worker's MLflow run and re-queues its trial; also Optuna's heartbeat stale-trial callback."""

    def __init__(self, max_retry: int = 2):
        self.tracker = None  # set once the MLflow side is open
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial, reason: str = WORKER_DIED) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if self.tracker is not None and run_id:
            self.tracker.close_run(run_id, state="FAIL", reason=reason, status="KILLED")
        retries = trial.user_attrs.get("retries", 0) + 1
        if retries <= self.max_retry:
            attrs = {"retry_of": trial.number, "retries": retries}
            if trial.user_attrs.get("baseline"):
                attrs["baseline"] = True
            study.enqueue_trial(trial.params, user_attrs=attrs)


def fail_and_requeue(study: optuna.Study, handler: StaleTrialHandler, trial: FrozenTrial, reason: str) -> bool:
    """Fail a RUNNING trial whose process is gone, close its MLflow run KILLED and re-queue its parameters; False
    when another process did so first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, STALE_ATTR, True)
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    handler(study, storage.get_trial(trial._trial_id), reason)
    return True


def recover_dead_workers(study: optuna.Study, handler: StaleTrialHandler) -> list[int]:
    """Fail every RUNNING trial whose worker process on this host is gone; returns their numbers."""
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if worker_alive(t.user_attrs) is False and fail_and_requeue(study, handler, t, WORKER_DIED)]
