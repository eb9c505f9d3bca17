"""What the user sees: a progress bar over trials, one line per finished trial, and the closing summary."""
from __future__ import annotations

import shlex

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from study.errors import redact
from study.space import SEARCHED
from study.summary import baseline_trial, best_trial, comparison_table

SHORT = {"max_iters": "iters", "block_size": "block", "n_head": "heads", "n_embd": "embd",
         "dropout": "dropout", "learning_rate": "lr"}


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_line(t: FrozenTrial) -> str:
    params = " ".join(f"{SHORT[k]}={_fmt(t.params[k])}" for k in SEARCHED if k in t.params)
    if t.state == TrialState.COMPLETE:
        outcome = f"val {t.values[0]:.4f}" + (f", {t.values[1]:.0f}s" if len(t.values) > 1 else "")
    elif t.state == TrialState.PRUNED:
        cut = "cut by --timeout " if t.user_attrs.get("cut_by_timeout") else ""
        outcome = f"{cut}at step {t.user_attrs.get('pruned_at_step', '?')}" + \
            (f", val {t.intermediate_values[t.last_step]:.4f}" if t.last_step is not None else "")
    else:
        outcome = t.user_attrs.get("fail_reason", "")
    seconds = t.duration.total_seconds() if t.duration else float("nan")
    tag = " (baseline)" if t.user_attrs.get("baseline") else ""
    return f"trial {t.number:>3} {t.state.name:<8} {seconds:6.1f}s  {outcome:<26} {params}{tag}"


class Progress:
    """Optuna study callback: advances the bar, shows the best value so far, prints each trial's line."""

    def __init__(self, total: int, bar: bool = True, prefix: str = ""):
        self.bar = tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True, disable=not bar)
        self.prefix = prefix

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.bar.write(self.prefix + trial_line(trial))
        best = best_trial(study)
        if best is not None:
            self.bar.set_postfix_str(f"best val {best.values[0]:.4f} (trial {best.number})")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def print_summary(study: optuna.Study, summary: dict, settings, runs_url: str) -> None:
    print(f"\n{summary['n_trials']} trials in study {study.study_name}: {summary['n_complete']} complete, "
          f"{summary['n_pruned']} pruned, {summary['n_failed']} failed")
    best, base = best_trial(study), baseline_trial(study)
    # the summary's snapshot decides: workers elsewhere may have finished trials since it was taken
    if best is not None and base is not None and "baseline_best_val_loss" in summary:
        table = comparison_table(base, best)[["baseline", "tuned", "change_pct"]]
        print(table.drop(["val_loss", "train_loss", "generalization_gap", "startup_s"]).to_string(
            float_format=lambda v: f"{v:.4g}", na_rep=""))
        print(f"best val loss {summary['baseline_best_val_loss']:.4f} -> {summary['best_val_loss']:.4f} "
              f"({-summary['improvement_pct']:+.1f}%)")
    elif best is not None:
        print(f"best: trial {best.number}, val loss {best.values[0]:.4f} (the baseline trial did not complete)")
    if "best_found_after_s" in summary:
        print(f"search: {summary['search_wall_s'] / 60:.1f} min wall, {summary['trials_s'] / 60:.1f} min of "
              f"trials; the best trial finished after {summary['best_found_after_s'] / 60:.1f} min")
    if "pareto_trials" in summary:
        print(f"Pareto front (val loss vs runtime): trials {summary['pareto_trials']}")
    tracking_uri = settings.tracking_uri
    ui = f"open {runs_url}" if tracking_uri.startswith("http") else \
        f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}\n                     then open {runs_url}"
    report = f"python reports/generate.py --study-name {shlex.quote(study.study_name)}"
    shown = settings.shown
    for flag, value in (("--storage", shown.get("storage")), ("--tracking-uri", shown.get("tracking_uri"))):
        if value:
            report += f" {flag} {shlex.quote(redact(value))}"
    print(f"\nBrowse every trial:  {ui}\nWrite the report:    {report}")
