"""The two ways into a study's stores: create them once (safe however many processes start together), or join.

`create_stores` makes the Optuna study with its baseline trial and MLflow's experiment and parent run, or checks
that an existing study has the same set-up; every `python study/run.py` runs it. `join_stores` is a worker's way
in: it opens what the set-up made and creates nothing.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict

import optuna
from optuna.distributions import distribution_to_json

from model.config import ConfigError
from model.data import Corpus, DataError
from study.errors import RayError
from study.options import OBJECTIVES
from study.recovery import StaleTrialHandler, recover_dead_workers
from study.settings import StudySettings
from study.space import PRESETS, SpaceError
from study.storage import StorageError, make_pruner, make_sampler, make_storage, setup_lock
from study.tracking import StudyTracker, TrackingError

# What setting a study up may raise, each a one-line message naming the input: nothing has run then.
# how this machine runs a trial, not what the trial is: a study may be resumed on other hardware
MACHINE_SETTINGS = ("device", "compile", "precision")
SETUP_ERRORS = (ConfigError, DataError, SpaceError, StorageError, TrackingError, RayError)


def configure_libraries() -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours to print
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the study prints its runs page once
    # A write to a tracking server that is away fails in seconds (MLflow's defaults retry for minutes) and is
    # spooled; the timeout is per socket operation, so large uploads still go through.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def create_stores(s: StudySettings, corpus: Corpus, handler: StaleTrialHandler) -> tuple[optuna.Study, StudyTracker]:
    """Create or resume the study in both stores; one process at a time per store, on any machine."""
    def on_wait() -> None:
        print(f"waiting for another process setting up a study in {s.storage_label}", flush=True)

    with setup_lock(s.storage, on_wait):
        study = _open_study(s, handler, create=True)
        _check_same_setup(study, s)
        if not study.trials:
            study.enqueue_trial(PRESETS[s.preset].baseline_params(), user_attrs={"baseline": True})
        tracker = StudyTracker(s.tracking_uri, s.study_name, s.spool_dir)
        tracker.open(study, {"preset": s.preset, "objective": s.objective, "sampler": s.sampler, "pruner": s.pruner,
                             "seed": s.seed, "corpus": corpus.name, "corpus_path": str(corpus.path),
                             "corpus_sha256": corpus.sha256, "storage": s.storage_label,
                             **{f"base.{k}": v for k, v in asdict(s.base).items()}})
    handler.tracker = tracker
    recovered = recover_dead_workers(study, handler)
    if recovered:
        print(f"trials {recovered} were left RUNNING by a worker that died: failed and re-queued", flush=True)
    return study, tracker


def join_stores(s: StudySettings, handler: StaleTrialHandler, worker_index: int) -> tuple[optuna.Study, StudyTracker]:
    """A worker's study and tracker: the set-up step made both; this creates nothing."""
    study = _open_study(s, handler, create=False)
    tracker = StudyTracker(s.tracking_uri, s.study_name, s.spool_dir)
    tracker.attach(study)
    handler.tracker = tracker
    # parallel workers must not propose the same parameters: each seeds its sampler differently
    study.sampler = make_sampler(s.sampler, s.seed + len(study.trials) + 1000 * worker_index)
    return study, tracker


def _open_study(s: StudySettings, handler: StaleTrialHandler, create: bool) -> optuna.Study:
    storage = make_storage(s.storage, s.heartbeat_interval, handler)
    pruner = make_pruner(s.pruner)
    directions = OBJECTIVES[s.objective]
    if create:
        study = optuna.create_study(storage=storage, study_name=s.study_name, directions=list(directions),
                                    pruner=pruner, load_if_exists=True)
    else:
        study = optuna.load_study(storage=storage, study_name=s.study_name, pruner=pruner)
    if len(study.directions) != len(directions):
        raise StorageError(f"study {s.study_name!r} has {len(study.directions)} objective(s); "
                           f"--objective {s.objective} needs {len(directions)}: pick another --study-name")
    # a resumed study must not replay its sampler: offset the seed by the trials already run
    study.sampler = make_sampler(s.sampler, s.seed + len(study.trials))
    return study


# What a trial's reported steps mean, and where asha's rungs stand on them: resumed trials must compare.
PRUNING_AXIS = "thousandths of the schedule; asha at 1/16 and 1/4"
EARLIER_AXIS = "thousandths of the schedule"  # asha at 1/8 and 1/2


def _check_same_setup(study: optuna.Study, s: StudySettings) -> None:
    """A resumed study must keep its corpus, search space and fixed settings, or its trials stop comparing."""
    setup = {"corpus_sha256": s.corpus_sha256, "pruning_axis": PRUNING_AXIS,
             "space": {k: distribution_to_json(v) for k, v in s.space.items()},
             "fixed": {k: v for k, v in asdict(s.base).items() if k not in MACHINE_SETTINGS}}
    stored = study.user_attrs.get("setup")
    if stored is not None:
        stored["fixed"].setdefault("arch", "gpt")  # studies from before the encoder-decoder were all of GPTs
    if stored is not None and stored.get("pruning_axis") == EARLIER_AXIS:
        if s.pruner == "asha":  # its trials' rung values stand at 1/8 and 1/2: the new rungs would compare unlike
            raise StorageError(f"study {s.study_name!r} was pruned at 1/8 and 1/2 of the schedules by an earlier "
                               "version; resume it with --pruner hyperband, median or none, or pick another "
                               "--study-name")
        stored["pruning_axis"] = PRUNING_AXIS
    if stored is None:
        if not study.trials:
            study.set_user_attr("setup", setup)
        return
    differs = [k for k in setup if stored.get(k) != setup[k]]
    if differs == ["fixed"]:  # name the flags
        old, new = stored["fixed"], setup["fixed"]
        changed = ", ".join(f"{k} {old.get(k)!r} (now {new.get(k)!r})" for k in sorted(new.keys() | old.keys())
                            if old.get(k) != new.get(k))
        raise StorageError(f"study {s.study_name!r} was created with other fixed settings: {changed}; "
                           "resume it unchanged or pick another --study-name")
    if differs:
        raise StorageError(f"study {s.study_name!r} was created with another {' and '.join(differs)} "
                           "(corpus, --space, preset or fixed flags); resume it unchanged or pick another --study-name")
