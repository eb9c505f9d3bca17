"""The report generator on tiny real studies: files, numbers matching both stores, images, edge cases."""
from __future__ import annotations

import base64
import os
from datetime import datetime, timedelta
from types import SimpleNamespace

import matplotlib.image
import pandas as pd
import pytest
from conftest import VERSE
from mlflow import MlflowClient

from model.train import OUTCOME
from reports import generate
from study.summary import PAUSE_S, wall_seconds
from study_helpers import load_study, run_study

PLOTS = {"optimization_history.png", "loss_curves.png", "importance.png", "param_slices.png",
         "loss_vs_runtime.png", "parallel_coordinates.png"}


def make_report(*args: str) -> int:
    try:
        return generate.main(list(args))
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A finished 6-trial smoke study (some pruned) in its own working directory."""
    work = tmp_path_factory.mktemp("study")
    (work / "verse.txt").write_text(VERSE * 12)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert run_study("--trials", "6", "--data", "verse.txt") == 0
    return work


@pytest.fixture
def in_study_dir(study_dir, monkeypatch):
    monkeypatch.chdir(study_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return study_dir


def test_every_file_is_written_and_matches_the_stores(in_study_dir):
    assert make_report("--study-name", "smoke-verse") == 0
    out = in_study_dir / "reports" / "smoke-verse"
    files = {p.name for p in out.iterdir()}
    assert {"report.md", "report.html", "comparison.csv", "trials.csv"} | PLOTS <= files

    study = load_study(in_study_dir)
    assert {t.state.name for t in study.trials} == {"COMPLETE", "PRUNED"}
    trials = pd.read_csv(out / "trials.csv", index_col="number")
    assert list(trials.index) == [t.number for t in study.trials]
    for t in study.trials:
        assert trials.loc[t.number, "state"] == t.state.name
        if t.state.name == "COMPLETE":
            assert trials.loc[t.number, "best_val_loss"] == pytest.approx(t.values[0], rel=1e-12)
        else:  # a pruned trial's value is its last report, which the table keeps in its own column
            assert trials.loc[t.number, "last_reported_val_loss"] == pytest.approx(t.values[0], rel=1e-12)
    comparison = pd.read_csv(out / "comparison.csv", index_col="quantity")
    assert comparison.loc["best_val_loss", "tuned"] == pytest.approx(study.best_value, rel=1e-12)
    assert comparison.loc["best_val_loss", "baseline"] == pytest.approx(study.trials[0].value, rel=1e-12)
    client = MlflowClient(f"sqlite:///{in_study_dir / 'mlflow.db'}")
    best_run = client.get_run(study.best_trial.user_attrs["mlflow_run_id"])
    assert comparison.loc["runtime_s", "tuned"] == pytest.approx(best_run.data.metrics["runtime_s"], rel=1e-9)
    # one name per quantity: the outcome record is the same in MLflow, Optuna, trials.csv and comparison.csv
    for name in OUTCOME:
        assert comparison.loc[name, "tuned"] == pytest.approx(study.best_trial.user_attrs[name], rel=1e-9)
        assert trials.loc[study.best_trial.number, name] == pytest.approx(study.best_trial.user_attrs[name], rel=1e-9)
        logged = best_run.data.metrics.get(name, best_run.data.params.get(name))
        assert float(logged) == pytest.approx(study.best_trial.user_attrs[name], rel=1e-6), name
    assert not [k for k in best_run.data.metrics if k.startswith("final_")]

    html = (out / "report.html").read_text()
    for name in PLOTS:
        assert matplotlib.image.imread(out / name).ndim == 3  # decodes as an RGB(A) image
        assert base64.b64encode((out / name).read_bytes()).decode() in html
    md = (out / "report.md").read_text()
    assert "Tuning lowered the best val loss" in md or "No trial beat the baseline" in md
    # what the search cost: from the first trial's start to the last one's end, as the study's clock says
    starts, ends = [t.datetime_start for t in study.trials], [t.datetime_complete for t in study.trials]
    wall = (max(ends) - min(starts)).total_seconds()
    assert f"The search ran for {wall / 60:.1f} min of wall time" in md
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.html" in logged and "report/comparison.csv" in logged


def span(start_s: float, end_s: float, **attrs) -> SimpleNamespace:
    t0 = datetime(2026, 1, 1)
    return SimpleNamespace(datetime_start=t0 + timedelta(seconds=start_s),
                           datetime_complete=t0 + timedelta(seconds=end_s), user_attrs=attrs)


def test_search_wall_time_leaves_out_pauses_and_counts_parallel_trials_once():
    one_worker = [span(0, 100), span(102, 200), span(201, 300)]  # short gaps between trials: sampling, logging
    assert wall_seconds(one_worker) == 300
    two_workers = [span(0, 100), span(10, 250), span(101, 150)]
    assert wall_seconds(two_workers) == 250
    resumed = [span(0, 100), span(100 + PAUSE_S + 1, 200 + PAUSE_S + 1)]  # stopped, resumed later
    assert wall_seconds(resumed) == 200
    # a killed session's trial, failed when the next session found it: not a stretch of work
    assert wall_seconds([*resumed, span(50, 100 + PAUSE_S + 1, stale=True)]) == 200
    assert wall_seconds(one_worker, until=span(0, 150).datetime_complete) == 150
    assert wall_seconds([]) == 0


def test_rerunning_writes_the_same_tables(in_study_dir, tmp_path):
    assert make_report("--study-name", "smoke-verse", "--out", str(tmp_path / "a")) == 0
    assert make_report("--study-name", "smoke-verse", "--out", str(tmp_path / "b")) == 0
    for name in ("comparison.csv", "trials.csv", "report.md"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_confirmation_reruns_both_configurations_and_tracks_them(in_study_dir, tmp_path):
    assert make_report("--study-name", "smoke-verse", "--out", str(tmp_path / "r"), "--confirm-seeds", "2") == 0
    summary = pd.read_csv(tmp_path / "r" / "confirmation.csv", index_col="configuration")
    study = load_study(in_study_dir)
    assert study.best_trial.number != 0  # a tuned configuration exists, so both are re-trained
    assert list(summary.index) == ["baseline", "tuned"] and list(summary["seeds"]) == [2, 2]
    client = MlflowClient(f"sqlite:///{in_study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke-verse")
    runs = client.search_runs([experiment.experiment_id], "tags.confirmation = 'true'")
    assert len(runs) == 2 * len(summary)
    assert "fresh seeds" in (tmp_path / "r" / "report.md").read_text()


def test_unknown_study_and_empty_store_exit_2(in_study_dir, tmp_path, capsys):
    assert make_report("--study-name", "nope") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no study named 'nope'" in err and "smoke-verse" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    os.chdir(empty)
    assert make_report("--study-name", "smoke-verse") == 2
    assert "no Optuna journal" in capsys.readouterr().err
    assert list(empty.iterdir()) == []


def test_baseline_only_study_says_so(workdir, corpus_file):
    assert run_study("--trials", "1", "--data", corpus_file) == 0
    assert make_report("--study-name", "smoke-verse") == 0
    md = (workdir / "reports" / "smoke-verse" / "report.md").read_text()
    assert "Only the baseline trial has finished" in md
    assert (workdir / "reports" / "smoke-verse" / "comparison.csv").exists()


def test_multi_objective_study_lists_pareto_trials(workdir, corpus_file):
    assert run_study("--trials", "4", "--data", corpus_file, "--objective", "loss-time") == 0
    assert make_report("--study-name", "smoke-verse-loss-time") == 0
    comparison = pd.read_csv(workdir / "reports" / "smoke-verse-loss-time" / "comparison.csv", index_col="quantity")
    pareto = [c for c in comparison.columns if c.startswith("pareto_trial_")]
    assert pareto and len(pareto) == len(load_study(workdir, "smoke-verse-loss-time").best_trials)


def test_study_with_failed_and_pruned_trials_is_reported(workdir, corpus_file, tmp_path):
    space = tmp_path / "huge_lr.yaml"
    space.write_text("learning_rate:\n  low: 100.0\n  high: 1000.0\n  log: true\n")
    assert run_study("--trials", "3", "--data", corpus_file, "--space", str(space)) == 0
    assert make_report("--study-name", "smoke-verse") == 0
    trials = pd.read_csv(workdir / "reports" / "smoke-verse" / "trials.csv", index_col="number")
    assert list(trials["state"]) == ["COMPLETE", "FAIL", "FAIL"]
    assert trials["fail_reason"].iloc[1].startswith("TrainingDiverged")
    assert "2 failed" in (workdir / "reports" / "smoke-verse" / "report.md").read_text()


def test_out_that_is_not_an_earlier_report_is_refused(in_study_dir, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert make_report("--study-name", "smoke-verse", "--out", str(precious)) == 2
    assert "is not an earlier report" in capsys.readouterr().err
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
