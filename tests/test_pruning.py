"""Pruning judges a trial against the others at the same point of their schedules, not at the same step."""
from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from study.objective import ReportToOptuna
from study.storage import make_pruner
from study.summary import trials_table


def train_like(study: optuna.Study, max_iters: int, offset: float, evals: int = 8) -> optuna.trial.FrozenTrial:
    """A trial whose val loss follows one curve of the schedule's progress, shifted by offset, evals times."""
    trial = study.ask()
    reporter = ReportToOptuna(trial, max_iters)
    try:
        for step in range(max_iters // evals, max_iters + 1, max_iters // evals):
            reporter.on_eval(step, {"val_loss": 3.0 - step / max_iters + offset})
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED)
    return study.tell(trial, 3.0 - 1.0 + offset)


@pytest.fixture
def study():
    return optuna.create_study(pruner=make_pruner("asha"), storage=optuna.storages.InMemoryStorage())


def test_a_short_trial_behind_at_the_same_point_is_pruned_though_ahead_at_the_same_step(study):
    train_like(study, max_iters=8000, offset=0.0)
    short = train_like(study, max_iters=2000, offset=0.01)
    # at step 250 the long trial had done a thirty-second of its schedule and was far behind
    assert short.state == TrialState.PRUNED and short.user_attrs["pruned_at_step"] == 250
    assert short.last_step == 125  # Optuna's step: thousandths of the schedule, an eighth
    assert trials_table(study).loc[short.number, "last_step"] == 250  # trials.csv: the training step


def test_a_long_trial_ahead_at_the_same_point_is_kept_though_behind_at_the_same_step(study):
    train_like(study, max_iters=4000, offset=0.0)
    long = train_like(study, max_iters=8000, offset=-0.01)
    assert long.state == TrialState.COMPLETE
    assert sorted(long.intermediate_values) == [125 * k for k in range(1, 9)]


def test_evals_closer_than_a_thousandth_of_the_schedule_report_once(study):
    trial = study.ask()
    reporter = ReportToOptuna(trial, max_iters=5000)
    for step in range(1, 11):  # steps 1-4 are at point 0, 5-9 at point 1, 10 at point 2
        reporter.on_eval(step, {"val_loss": 3.0})
    assert sorted(study.trials[0].intermediate_values) == [0, 1, 2]


def test_no_trial_is_judged_before_its_first_eval_from_judge_from(study):
    train_like(study, max_iters=2000, offset=0.0)
    trial = study.ask()
    reporter = ReportToOptuna(trial, max_iters=2000, judge_from=500)
    reporter.on_eval(250, {"val_loss": 9.0})  # far behind, but only reported
    assert trial.should_prune() and sorted(study.trials[-1].intermediate_values) == [125]
    with pytest.raises(optuna.TrialPruned):
        reporter.on_eval(500, {"val_loss": 9.0})
    assert study.trials[-1].user_attrs["pruned_at_step"] == 500


def test_past_a_quarter_of_its_schedule_only_a_trial_among_the_two_best_there_runs_on(study):
    for offset in [0.01 * k for k in range(11, -1, -1)]:  # each the best so far: all twelve run to the end
        assert train_like(study, max_iters=2000, offset=offset).state == TrialState.COMPLETE
    # third best at a quarter: in the best quarter of thirteen, but not among the two best
    third = train_like(study, max_iters=2000, offset=0.015)
    assert third.state == TrialState.PRUNED and third.user_attrs["pruned_at_step"] == 500
    second = train_like(study, max_iters=2000, offset=0.005)
    assert second.state == TrialState.COMPLETE


def test_an_exempt_trial_is_compared_with_but_never_stopped(study):
    train_like(study, max_iters=2000, offset=0.0)
    trial = study.ask()
    reporter = ReportToOptuna(trial, max_iters=2000, exempt=True)
    for step in range(250, 2001, 250):
        reporter.on_eval(step, {"val_loss": 9.0})  # far behind at every point
    assert study.tell(trial, 9.0).state == TrialState.COMPLETE
    fresh = optuna.create_study(pruner=make_pruner("asha"), storage=optuna.storages.InMemoryStorage())
    exempt = fresh.ask()
    reporter = ReportToOptuna(exempt, max_iters=2000, exempt=True)
    for step in range(250, 2001, 250):
        reporter.on_eval(step, {"val_loss": 2.0})
    fresh.tell(exempt, 2.0)
    behind = train_like(fresh, max_iters=2000, offset=0.0)  # alone at its rung it would go on; behind the exempt, not
    assert behind.state == TrialState.PRUNED
