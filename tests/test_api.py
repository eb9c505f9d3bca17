"""The Python API a notebook uses: run a study, load its trials as a DataFrame, write its report."""
from __future__ import annotations

import pickle

import pytest

from model.config import ConfigError
from model.train import OUTCOME
from reports.generate import generate_report, load_trials
from study.options import parse_options
from study.run import run_study
from study.settings import settings_from_options


def test_a_notebook_runs_a_study_loads_its_trials_and_writes_its_report(workdir, corpus_file):
    study = run_study(trials=3, preset="smoke", device="cpu", data=corpus_file, study_name="nb")
    assert len(study.trials) == 3 and study.trials[0].user_attrs["baseline"]

    study = run_study(trials=2, preset="smoke", device="cpu", data=corpus_file, study_name="nb")  # resumes
    trials = load_trials("nb")
    assert list(trials.index) == [0, 1, 2, 3, 4]
    assert {"state", "max_iters", "learning_rate", *OUTCOME, "mlflow_run_id"} <= set(trials.columns)
    done = trials[trials["state"] == "COMPLETE"]
    assert done["best_val_loss"].min() == pytest.approx(study.best_value)

    out = generate_report("nb", out=str(workdir / "nb-report"))
    assert (out / "report.md").is_file() and (out / "trials.csv").is_file()


@pytest.mark.parametrize("options, error, message", [
    ({"trials": 0}, ConfigError, "--trials must be at least 1, got 0"),
    ({"preset": "huge"}, ConfigError, "--preset must be one of"),
    ({"n_layers": 2}, TypeError, "unknown option n_layers"),
    ({"trials": "ten"}, TypeError, "option trials must be int, got 'ten'"),
    ({"worker_index": 1}, TypeError, "unknown option worker_index"),
])
def test_bad_api_options_raise_before_anything_is_created(workdir, corpus_file, options, error, message):
    with pytest.raises(error, match=message):
        run_study(**{"preset": "smoke", "device": "cpu", "data": corpus_file, **options})
    assert list(workdir.iterdir()) == []


def test_a_missing_study_raises_a_clear_error(workdir):
    with pytest.raises(ValueError, match="no Optuna journal"):
        load_trials("absent")


def test_workers_receive_the_settings_object_the_launcher_checked(corpus_file):
    """A launched worker gets the checked settings themselves (spawn pickles them), not flags to parse again."""
    args = parse_options(["--trials", "7", "--preset", "smoke", "--no-compile", "--weight-decay", "0.05",
                                 "--batch-size", "4", "--sample-prompt", "A B", "--storage", "sqlite:///x.db",
                                 "--timeout", "2.5", "--data", corpus_file, "--tracking-uri", "sqlite:///m.db"])
    settings, corpus = settings_from_options(args)
    received = pickle.loads(pickle.dumps(settings))
    assert received == settings
    assert (received.base.weight_decay, received.base.batch_size, received.base.compile) == (0.05, 4, False)
    assert received.load_corpus().sha256 == corpus.sha256
