"""The study command's work: create or resume a study, run its trials here or in workers, close it; `main()` is
`python study/run.py`, `run_study()` the same from Python."""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Sequence

import optuna
import torch
from mlflow.exceptions import MlflowException

from model.cli import fail
from model.data import Corpus
from study import ray_trials
from study.errors import first_line, redact
from study.options import PROG, options_from_keywords, parse_options
from study.progress import print_summary
from study.recovery import StaleTrialHandler
from study.registry import settle_best_model
from study.settings import StudySettings, settings_from_options
from study.setup import SETUP_ERRORS, configure_libraries, create_stores
from study.stopping import Stop, stop_on_signals
from study.summary import study_summary
from study.tracking import resolve_tracking_uri
from study.workers import Launcher, run_trials


def execute(s: StudySettings, corpus: Corpus) -> tuple[optuna.Study, dict, str]:
    """Create or resume the study's stores, run its trials here or in launched workers, close the study.

    Returns the study, its summary and the parent run's end status. Raises the SETUP_ERRORS (and MlflowException)
    when the stores cannot be set up: nothing has run then.
    """
    configure_libraries()
    if s.threads:
        torch.set_num_threads(s.threads)
    handler = StaleTrialHandler()
    if s.ray_address:  # before anything is created: a cluster that is not there, or cannot share the stores
        ray_trials.connect(s.ray_address)
        ray_trials.check_cluster(s)
    study, tracker = create_stores(s, corpus, handler)
    tracker.client.catch_up()  # runs an earlier run spooled while the tracking server was away
    print(f"study {s.study_name}: +{s.trials} trials ({len(study.trials)} stored), preset {s.preset}, "
          f"{s.sampler} sampler, {'no pruning' if s.pruner == 'none' else 'pruner ' + s.pruner}, "
          f"objective {s.objective}; tracking {redact(s.tracking_uri)}", flush=True)
    if s.timeout is not None:  # one deadline for this process and its workers, however late each starts
        s = dataclasses.replace(s, deadline=time.time() + s.timeout)
    status = "FINISHED"
    try:
        if s.ray_address:
            done = ray_trials.RayLauncher(s).run(study, handler, tracker)
        elif s.workers > 1:
            done = Launcher(s).run(study, handler)
        else:
            with stop_on_signals(Stop()) as stop:
                done = run_trials(s, corpus, study, tracker, handler, stop)
        status = "FINISHED" if done else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        summary = study_summary(study)
        tracker.finish(summary, summary.get("checkpoint_run_id"), status)
        settle_best_model(tracker, summary, s.sample)
        tracker.client.close()
    print_summary(study, summary, s, tracker.runs_url())
    return study, summary, status


def run_study(**options) -> optuna.Study:
    """Run (or resume) a study from Python, as `python study/run.py` does, and return it.

    Options are the command line's, named as its flags with underscores: `run_study(trials=20, preset="cpu",
    data="input.txt", n_layer=2)`. Impossible options raise ValueError (or TypeError for unknown names);
    Ctrl-C fails the running trial, closes the study's run, and raises KeyboardInterrupt. Trials run in this process
    unless `workers` (or `trials_per_gpu`) is given, whatever the preset.
    """
    if "workers" not in options and "trials_per_gpu" not in options:
        options["workers"] = 1  # workers are spawned processes: a script without a __main__ guard would re-run
    study, _, status = execute(*settings_from_options(options_from_keywords(**options)))
    if status == "KILLED":
        raise KeyboardInterrupt
    return study


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    try:
        _, _, status = execute(*settings_from_options(options))
    except SETUP_ERRORS as exc:
        fail(str(exc), PROG)
    except MlflowException as exc:
        fail(f"MLflow tracking at {redact(resolve_tracking_uri(options.tracking_uri))}: {first_line(exc)}", PROG)
    if status != "KILLED":
        return 0
    print(f"{PROG}: interrupted; the running trials are marked FAIL. Run the same command to resume.",
          file=sys.stderr)
    return 130
