"""Reading a study's outcome: best and baseline trials, the summary, the baseline-vs-tuned comparison."""
from __future__ import annotations

import math

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from model.train import OUTCOME
from study.recovery import STALE_ATTR
from study.space import SEARCHED

COMPARED = (*SEARCHED, "best_val_loss", "val_loss", "train_loss", "generalization_gap", "runtime_s", "startup_s",
            "tokens_per_s", "n_params")


def trial_figures(t: FrozenTrial) -> dict:
    """A completed trial's hyperparameters and outcome record, plus the generalization gap (val - train loss)."""
    figures = {k: t.params.get(k) for k in SEARCHED}
    figures.update({k: t.user_attrs.get(k) for k in OUTCOME}, best_val_loss=t.values[0])
    if figures["train_loss"] is not None and figures["val_loss"] is not None:
        figures["generalization_gap"] = figures["val_loss"] - figures["train_loss"]
    return figures


def comparison_table(baseline: FrozenTrial, best: FrozenTrial, pareto: list[FrozenTrial] = ()) -> pd.DataFrame:
    """Rows: hyperparameters and results. Columns: baseline, tuned, their change, then any Pareto trials."""
    base, tuned = trial_figures(baseline), trial_figures(best)
    table = pd.DataFrame({"baseline": pd.Series(base), "tuned": pd.Series(tuned)}).reindex(list(COMPARED))
    table = table.astype(float)
    table["change"] = table["tuned"] - table["baseline"]
    table["change_pct"] = 100 * table["change"] / table["baseline"].where(table["baseline"] != 0)
    for t in pareto:
        table[f"pareto_trial_{t.number}"] = pd.Series(trial_figures(t)).reindex(list(COMPARED)).astype(float)
    table.index.name = "quantity"
    table.attrs.update(baseline_trial=baseline.number, tuned_trial=best.number)
    return table


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials with a finite val loss."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and math.isfinite(t.values[0])]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """Lowest val loss among completed trials (for a loss-time study too: its most accurate Pareto point)."""
    return min(completed_trials(study), key=lambda t: t.values[0], default=None)


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    """The baseline trial: its completed run if it was re-queued after a crash, else the first."""
    runs = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")]
    return next((t for t in runs if t.state == TrialState.COMPLETE), runs[0] if runs else None)


def last_training_step(t: FrozenTrial) -> int | None:
    """The training step a trial reached: where it was pruned, or its max_iters once complete."""
    if t.state == TrialState.PRUNED:
        return t.user_attrs.get("pruned_at_step")
    return t.params.get("max_iters") if t.state == TrialState.COMPLETE else None


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, every state: objective value(s), the six hyperparameters, the outcome record, failures."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = t.intermediate_values.get(t.last_step) if t.last_step is not None else None
        row = {"number": t.number, "state": t.state.name, "baseline": bool(t.user_attrs.get("baseline", False))}
        row.update({k: t.params.get(k) for k in SEARCHED})
        row.update({k: t.user_attrs.get(k) for k in OUTCOME})
        # Optuna stores a pruned trial's last report as its value: only completed trials have a best
        row["best_val_loss"] = t.values[0] if t.values and t.state == TrialState.COMPLETE else None
        if t.values and len(t.values) > 1:
            row["runtime_s"] = t.values[1]
        row.update(last_reported_val_loss=last, last_step=last_training_step(t),
                   duration_s=t.duration.total_seconds() if t.duration else None,
                   fail_reason=t.user_attrs.get("fail_reason"), mlflow_run_id=t.user_attrs.get("mlflow_run_id"))
        rows.append(row)
    return pd.DataFrame(rows).set_index("number").sort_index()


PAUSE_S = 600  # no trial running for this long: the study was stopped and resumed later


def wall_seconds(trials: list[FrozenTrial], until=None) -> float:
    """The study's wall time, up to `until`: from the first trial's start to the last one's end, without pauses
    (PAUSE_S or more with no trial running, as between a stopped session and its resumption). Parallel workers'
    trials count once, and the short gaps between one trial and the next (sampling, logging) count. A trial whose
    worker died is left out: it was marked failed when it was found, perhaps a session later."""
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials
                   if t.datetime_start and t.datetime_complete and not t.user_attrs.get(STALE_ATTR))
    total, first, last = 0.0, None, None  # first, last: the stretch being measured
    for start, end in spans:
        if until is not None:
            if start >= until:
                break
            end = min(end, until)
        if last is not None and (start - last).total_seconds() < PAUSE_S:
            last = max(last, end)
            continue
        if last is not None:
            total += (last - first).total_seconds()
        first, last = start, end
    return total + ((last - first).total_seconds() if last is not None else 0.0)


def study_summary(study: optuna.Study) -> dict:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    best, base = best_trial(study), baseline_trial(study)
    summary = {"n_trials": len(trials), "n_complete": count[TrialState.COMPLETE],
               "n_pruned": count[TrialState.PRUNED], "n_failed": count[TrialState.FAIL],
               "search_wall_s": wall_seconds(trials),
               "trials_s": sum(t.duration.total_seconds() for t in trials
                               if t.duration and not t.user_attrs.get(STALE_ATTR))}
    if best is not None:
        summary.update(best_trial=best.number, best_val_loss=best.values[0], best_params=dict(best.params),
                       best_run_id=best.user_attrs.get("mlflow_run_id"),
                       best_found_after_s=wall_seconds(trials, until=best.datetime_complete))
        # workers finishing at once can each miss being "best so far": take the best trial that saved one
        saved = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("checkpoint")]
        if saved:
            summary["checkpoint_run_id"] = min(saved, key=lambda t: t.values[0]).user_attrs.get("mlflow_run_id")
    if base is not None and base.state == TrialState.COMPLETE:
        summary["baseline_best_val_loss"] = base.values[0]
        if best is not None:
            summary["improvement"] = base.values[0] - best.values[0]
            summary["improvement_pct"] = 100 * summary["improvement"] / base.values[0]
    if len(study.directions) > 1:
        summary["pareto_trials"] = [t.number for t in study.best_trials]
    return summary
