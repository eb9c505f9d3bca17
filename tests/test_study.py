"""The study runner end to end on the smoke preset: Optuna trials, MLflow runs, pruning, resume, failures."""
from __future__ import annotations

import subprocess

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from study.options import parse_options
from study.space import PRESETS, SEARCHED
from study_helpers import (
    SYSTEM_METRICS,
    child_runs,
    env_without_tracking,
    holding,
    load_study,
    parent_runs,
    run_study,
    study_cmd,
    system_metrics_monitors,
)


def test_four_trials_leave_four_optuna_trials_and_four_child_runs(workdir, corpus_file):
    assert run_study("--trials", "4", "--pruner", "none", "--data", corpus_file) == 0
    study = load_study(workdir)
    assert len(study.trials) == 4
    baseline = study.trials[0]
    assert baseline.user_attrs["baseline"] is True
    assert baseline.params == PRESETS["smoke"].baseline_params()
    assert all(t.state == TrialState.COMPLETE for t in study.trials)

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (parent,) = parent_runs(client, "smoke-verse")
    children = child_runs(client, "smoke-verse")
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_number = {int(c.data.tags["trial_number"]): c for c in children}
    for trial in study.trials:
        run = by_number[trial.number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert set(SEARCHED) <= run.data.params.keys()
        assert {"n_params", "device", "precision", "corpus", "corpus_sha256", "code_version",
                "seed"} <= run.data.params.keys()
        assert run.data.params["learning_rate"] == str(trial.params["learning_rate"])
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(10, trial.params["max_iters"] + 1, 10))
        assert run.data.metrics["best_val_loss"] == pytest.approx(trial.value)
        assert run.data.tags["optuna_state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert SYSTEM_METRICS <= run.data.metrics.keys()
        assert run.data.tags["baseline"] == str(trial.number == 0)
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"sample.txt", "loss_curves.csv"} <= files
        sample = client.download_artifacts(run.info.run_id, "sample.txt", str(workdir / f"s{trial.number}"))
        assert open(sample).read().startswith("First Ci")  # no "ROMEO:" in this corpus: its opening is the prompt
    assert parent.info.status == "FINISHED"
    assert not system_metrics_monitors()
    assert parent.data.metrics["best_val_loss"] == pytest.approx(study.best_value)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"best_checkpoint", "study_summary.json"}


@pytest.mark.parametrize("pruner", ["asha", "hyperband"])
def test_pruning_reports_points_of_the_schedule_and_records_the_step(workdir, corpus_file, pruner):
    assert run_study("--trials", "8", "--data", corpus_file, "--pruner", pruner) == 0
    study = load_study(workdir)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, [t.state for t in study.trials]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = {int(c.data.tags["trial_number"]): c for c in child_runs(client, "smoke-verse")}
    for t in pruned:
        step, max_iters = t.user_attrs["pruned_at_step"], t.params["max_iters"]
        assert step < max_iters
        # Optuna holds one report per eval, at the thousandths of the trial's schedule done by then
        assert sorted(t.intermediate_values) == [1000 * s // max_iters for s in range(10, step + 1, 10)]
        assert runs[t.number].data.tags["optuna_state"] == "PRUNED"
        assert SYSTEM_METRICS <= runs[t.number].data.metrics.keys()
        assert client.get_metric_history(runs[t.number].info.run_id, "val_loss")[-1].step == step  # MLflow: steps


def test_resuming_adds_trials_to_the_same_study(workdir, corpus_file):
    args = ("--trials", "2", "--data", corpus_file, "--pruner", "none")
    assert run_study(*args) == 0
    assert run_study(*args) == 0
    study = load_study(workdir)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert [t.user_attrs.get("baseline", False) for t in study.trials] == [True, False, False, False]
    assert len(set(tuple(sorted(t.params.items())) for t in study.trials)) == 4  # the sampler did not replay
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert len(parent_runs(client, "smoke-verse")) == 1
    assert len(child_runs(client, "smoke-verse")) == 4


def test_diverging_trials_fail_with_their_reason_and_the_study_completes(workdir, corpus_file, tmp_path):
    space = tmp_path / "huge_lr.toml"
    space.write_text("[learning_rate]\nlow = 100.0\nhigh = 1000.0\nlog = true\n")
    assert run_study("--trials", "3", "--data", corpus_file, "--space", str(space), "--pruner", "none") == 0
    study = load_study(workdir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = {int(c.data.tags["trial_number"]): c for c in child_runs(client, "smoke-verse")}
    for t in study.trials[1:]:
        assert t.user_attrs["fail_reason"].startswith("TrainingDiverged: loss became non-finite")
        assert runs[t.number].info.status == "FAILED"
        assert SYSTEM_METRICS <= runs[t.number].data.metrics.keys()
        assert runs[t.number].data.tags["failure_reason"] == t.user_attrs["fail_reason"]
        assert "error.txt" in {a.path for a in client.list_artifacts(runs[t.number].info.run_id)}


def test_ctrl_c_fails_the_running_trial_in_both_stores_and_the_command_resumes(workdir, corpus_file, monkeypatch,
                                                                                capsys):
    import study.objective as objective_module

    real_train, calls = objective_module.train, []

    def interrupted_on_second_trial(config, corpus, callbacks):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(config, corpus, callbacks)

    monkeypatch.setattr(objective_module, "train", interrupted_on_second_trial)
    args = ("--trials", "3", "--data", corpus_file, "--pruner", "none")
    assert run_study(*args) == 130
    assert "Run the same command to resume" in capsys.readouterr().err
    study = load_study(workdir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (killed,) = [c for c in child_runs(client, "smoke-verse") if c.data.tags["trial_number"] == "1"]
    assert killed.info.status == "KILLED" and killed.data.tags["optuna_state"] == "FAIL"
    assert SYSTEM_METRICS <= killed.data.metrics.keys() and not system_metrics_monitors()
    assert parent_runs(client, "smoke-verse")[0].info.status == "KILLED"

    monkeypatch.setattr(objective_module, "train", real_train)
    assert run_study(*args) == 0
    assert len(load_study(workdir).trials) == 5
    assert parent_runs(client, "smoke-verse")[0].info.status == "FINISHED"


def test_loss_time_study_has_two_objectives_and_a_pareto_front(workdir, corpus_file, capsys):
    assert run_study("--trials", "3", "--data", corpus_file, "--objective", "loss-time") == 0
    study = load_study(workdir, "smoke-verse-loss-time")
    assert len(study.directions) == 2
    assert all(len(t.values) == 2 and t.values[1] > 0 for t in study.trials)
    assert "Pareto front (val loss vs runtime): trials" in capsys.readouterr().out


def test_help_names_every_preset_and_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_options(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "{gpu,cpu,smoke}" in out and "--n-layer" in out and "--workers" in out
    assert "--learning-rate" not in out  # searched, not fixed


def test_resuming_with_another_setup_is_refused(workdir, corpus_file, capsys):
    assert run_study("--trials", "1", "--data", corpus_file) == 0
    capsys.readouterr()
    assert run_study("--trials", "1", "--data", corpus_file, "--n-layer", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was created with other fixed settings: n_layer 1 (now 2)" in err
    assert len(load_study(workdir).trials) == 1


def test_a_study_pruned_on_the_earlier_rungs_resumes_with_another_pruner_but_not_asha(workdir, corpus_file, capsys):
    from study.setup import EARLIER_AXIS

    assert run_study("--trials", "1", "--data", corpus_file) == 0
    study = load_study(workdir)
    study.set_user_attr("setup", {**study.user_attrs["setup"], "pruning_axis": EARLIER_AXIS})  # as stored before
    capsys.readouterr()
    assert run_study("--trials", "1", "--data", corpus_file, "--pruner", "asha") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pruned at 1/8 and 1/2 of the schedules by an earlier version" in err
    assert run_study("--trials", "1", "--data", corpus_file, "--pruner", "median") == 0
    assert len(load_study(workdir).trials) == 2


def test_timeout_cuts_the_running_trial_at_its_next_step_and_records_it_pruned(workdir, corpus_file, tmp_path):
    """The held trial would train until released: the deadline, not the trial's end, finishes the study."""
    env = holding(env_without_tracking(), tmp_path / "hold", trials=1)
    proc = subprocess.run(study_cmd(corpus_file, "--trials", "3", "--timeout", "3"), cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (trial,) = load_study(workdir).trials  # no trial starts after the deadline
    assert trial.state == TrialState.PRUNED and trial.user_attrs["cut_by_timeout"]
    assert "cut by --timeout at step" in proc.stdout
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = child_runs(client, "smoke-verse")
    assert run.info.status == "FINISHED" and run.data.tags["optuna_state"] == "PRUNED"
    assert [p.info.status for p in parent_runs(client, "smoke-verse")] == ["FINISHED"]
