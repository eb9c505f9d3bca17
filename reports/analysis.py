"""Numbers the report states beyond the comparison table: importances, sample quality, findings."""
from __future__ import annotations

import re
import warnings

import optuna
import pandas as pd

WORD = re.compile(r"[A-Za-z']+")


def importances(study: optuna.Study) -> pd.Series | None:
    """Each hyperparameter's share of the val loss variation (Optuna's default evaluator), or None if too few trials."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study, target=lambda t: t.values[0])
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None
    return pd.Series(values, name="importance").sort_values(ascending=False) if values else None


def word_share(text: str, corpus_words: set[str]) -> float | None:
    """Share of the generated words that occur in the training corpus: a crude but honest fluency figure."""
    words = WORD.findall(text)
    return sum(w in corpus_words for w in words) / len(words) if words else None


def corpus_words(text: str) -> set[str]:
    return set(WORD.findall(text))


def findings(table: pd.DataFrame | None, imp: pd.Series | None, counts: dict, confirmation: dict | None,
             missing: str | None = None, spent: dict | None = None) -> list[str]:
    """A few sentences computed from the data; `missing` says why there is no comparison table; `spent` is the
    study summary's time figures (search_wall_s, trials_s, best_found_after_s)."""
    out = [f"{counts['total']} trials: {counts['COMPLETE']} completed, {counts['PRUNED']} pruned, "
           f"{counts['FAIL']} failed."]
    if table is None:
        out.append(missing or "There is no tuned configuration to compare yet.")
        return out + time_spent(spent, found=False)
    loss, runtime = table.loc["best_val_loss"], table.loc["runtime_s"]
    b, t = table.attrs["baseline_trial"], table.attrs["tuned_trial"]
    if b == t:
        out.append(f"No trial beat the baseline (trial {b}): its best val loss {loss['baseline']:.4f} stands.")
    else:
        out.append(f"Tuning lowered the best val loss from {loss['baseline']:.4f} (baseline, trial {b}) to "
                   f"{loss['tuned']:.4f} (trial {t}), {loss['change_pct']:+.1f}%.")
        if pd.notna(runtime["change_pct"]):
            word = "more" if runtime["change"] > 0 else "less"
            out.append(f"The tuned configuration trains in {runtime['tuned']:.1f} s against "
                       f"{runtime['baseline']:.1f} s ({abs(runtime['change_pct']):.0f}% {word} time).")
    out += time_spent(spent, found=b != t)
    if imp is not None and len(imp):
        top = ", ".join(f"{name} ({share:.0%})" for name, share in imp.head(3).items())
        out.append(f"The hyperparameters that mattered most for val loss: {top}.")
    if confirmation:
        out.append(confirmation["verdict"])
    return out


def time_spent(spent: dict | None, found: bool) -> list[str]:
    """What the search cost in time; `found`: say when it reached the tuned configuration."""
    if not spent:
        return []
    line = (f"The search ran for {spent['search_wall_s'] / 60:.1f} min of wall time "
            f"({spent['trials_s'] / 60:.1f} min of trials in all)")
    if found and "best_found_after_s" in spent:
        line += f" and had found the tuned configuration after {spent['best_found_after_s'] / 60:.1f} min"
    return [line + "."]
