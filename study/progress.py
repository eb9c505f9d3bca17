"""What the user sees: a progress bar over trials, one line per finished trial, and the closing summary."""
from __future__ import annotations

import math
import shlex

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from study.space import SEARCHED
from study.tracking import redact

SHORT = {"max_iters": "iters", "block_size": "block", "n_head": "heads", "n_embd": "embd",
         "dropout": "dropout", "learning_rate": "lr"}


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_line(t: FrozenTrial) -> str:
    params = " ".join(f"{SHORT[k]}={_fmt(t.params[k])}" for k in SEARCHED if k in t.params)
    if t.state == TrialState.COMPLETE:
        outcome = f"val {t.values[0]:.4f}" + (f", {t.values[1]:.0f}s" if len(t.values) > 1 else "")
    elif t.state == TrialState.PRUNED:
        outcome = f"at step {t.last_step}, val {t.intermediate_values[t.last_step]:.4f}" if t.last_step else ""
    else:
        outcome = t.user_attrs.get("fail_reason", "")
    seconds = t.duration.total_seconds() if t.duration else float("nan")
    tag = " (baseline)" if t.user_attrs.get("baseline") else ""
    return f"trial {t.number:>3} {t.state.name:<8} {seconds:6.1f}s  {outcome:<26} {params}{tag}"


class Progress:
    """Optuna study callback: advances the bar, shows the best value so far, prints each trial's line."""

    def __init__(self, total: int, multi_objective: bool):
        self.bar = tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True)
        self.multi_objective = multi_objective

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.bar.write(trial_line(trial))
        best = best_trial(study)
        if best is not None:
            self.bar.set_postfix_str(f"best val {best.values[0]:.4f} (trial {best.number})")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """Lowest val loss among completed trials (for a loss-time study too: its most accurate Pareto point)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and math.isfinite(t.values[0])]
    return min(done, key=lambda t: t.values[0], default=None)


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    return next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")), None)


def study_summary(study: optuna.Study) -> dict:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    best, base = best_trial(study), baseline_trial(study)
    summary = {"n_trials": len(trials), "n_complete": count[TrialState.COMPLETE],
               "n_pruned": count[TrialState.PRUNED], "n_failed": count[TrialState.FAIL]}
    if best is not None:
        summary.update(best_trial=best.number, best_val_loss=best.values[0], best_params=dict(best.params),
                       best_run_id=best.user_attrs.get("mlflow_run_id"))
    if base is not None and base.state == TrialState.COMPLETE:
        summary["baseline_val_loss"] = base.values[0]
        if best is not None:
            summary["improvement"] = base.values[0] - best.values[0]
            summary["improvement_pct"] = 100 * summary["improvement"] / base.values[0]
    if len(study.directions) > 1:
        summary["pareto_trials"] = [t.number for t in study.best_trials]
    return summary


def comparison_table(base: FrozenTrial, best: FrozenTrial) -> pd.DataFrame:
    rows = {k: (base.params.get(k), best.params.get(k)) for k in SEARCHED}
    rows["best val loss"] = (base.values[0], best.values[0])
    for key in ("runtime_s", "n_params", "tokens_per_s"):
        rows[key] = (base.user_attrs.get(key), best.user_attrs.get(key))
    table = pd.DataFrame(rows, index=[f"baseline (trial {base.number})", f"best (trial {best.number})"]).T
    return table


def print_summary(study: optuna.Study, summary: dict, tracking_uri: str, args) -> None:
    print(f"\n{summary['n_trials']} trials in study {study.study_name}: {summary['n_complete']} complete, "
          f"{summary['n_pruned']} pruned, {summary['n_failed']} failed")
    best, base = best_trial(study), baseline_trial(study)
    if best is not None and base is not None and base.state == TrialState.COMPLETE:
        print(comparison_table(base, best).to_string(float_format=lambda v: f"{v:.4g}"))
        print(f"val loss {summary['baseline_val_loss']:.4f} -> {summary['best_val_loss']:.4f} "
              f"({-summary['improvement_pct']:+.1f}%)")
    elif best is not None:
        print(f"best: trial {best.number}, val loss {best.values[0]:.4f} (the baseline trial did not complete)")
    if "pareto_trials" in summary:
        print(f"Pareto front (val loss vs runtime): trials {summary['pareto_trials']}")
    ui = f"open {redact(tracking_uri)}" if tracking_uri.startswith("http") else \
        f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"
    report = f"python reports/generate.py --study-name {shlex.quote(study.study_name)}"
    if args.storage:
        report += f" --storage {shlex.quote(redact(args.storage))}"
    if args.tracking_uri:
        report += f" --tracking-uri {shlex.quote(args.tracking_uri)}"
    print(f"\nBrowse every trial:  {ui}\nWrite the report:    {report}")
