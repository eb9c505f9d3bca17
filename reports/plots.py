"""The report's figures, each written to a PNG: history, loss curves, importance, slices, runtime, coordinates."""
from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from study.space import SEARCHED  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")
STATE_STYLE = {"COMPLETE": ("tab:blue", "o"), "PRUNED": ("tab:orange", "v"), "FAIL": ("tab:red", "X")}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(trials: pd.DataFrame, path: Path) -> Path:
    """Val loss per trial with the best-so-far line; pruned trials at their last report, failed ones at the top."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    value = trials["best_val_loss"].fillna(trials["last_reported_val_loss"])
    finite = value.dropna()
    top = finite.max() if len(finite) else 1.0  # failed trials have no loss: drawn at the worst one seen
    for state, (color, marker) in STATE_STYLE.items():
        rows = trials[trials["state"] == state]
        if len(rows):
            y = value[rows.index].fillna(top) if state == "FAIL" else value[rows.index]
            ax.scatter(rows.index, y, c=color, marker=marker, s=45, label=state.lower(), zorder=3)
    done = trials["best_val_loss"].where(trials["state"] == "COMPLETE")
    ax.step(trials.index, done.cummin().ffill(), where="post", color="black", lw=1.5, label="best so far")
    base = trials[trials["baseline"]]
    if len(base) and pd.notna(base["best_val_loss"].iloc[0]):
        ax.axhline(base["best_val_loss"].iloc[0], color="gray", ls="--", lw=1, label="baseline")
    ax.set(xlabel="trial", ylabel="best val loss (pruned: last reported)", title="Optimization history")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_loss_curves(curves: dict[str, pd.DataFrame], path: Path) -> Path:
    """Train (dashed) and val (solid) loss against iteration, one colour per configuration."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (label, df), color in zip(curves.items(), sns.color_palette("deep")):
        ax.plot(df["step"], df["val_loss"], color=color, lw=2, label=f"{label} val")
        ax.plot(df["step"], df["train_loss"], color=color, lw=1.2, ls="--", label=f"{label} train")
    ax.set(xlabel="iteration", ylabel="loss", title="Loss curves: baseline vs tuned")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_importance(importance: pd.Series, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    sns.barplot(x=importance.values, y=importance.index, ax=ax, color="tab:blue")
    ax.set(xlabel="share of val loss variation", ylabel="", title="Hyperparameter importance")
    return _save(fig, path)


def plot_param_slices(trials: pd.DataFrame, path: Path) -> Path:
    """Val loss against each hyperparameter over the completed trials."""
    done = trials[trials["state"] == "COMPLETE"]
    fig, axes = plt.subplots(2, 3, figsize=(11, 6), sharey=True)
    for ax, name in zip(axes.flat, SEARCHED):
        sns.scatterplot(data=done, x=name, y="best_val_loss", hue=done.index, palette="viridis", legend=False,
                        ax=ax, s=40)
        if name == "learning_rate":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        base = done[done["baseline"]]
        if len(base):
            ax.scatter(base[name], base["best_val_loss"], s=140, facecolors="none", edgecolors="red", lw=1.5)
        ax.set(ylabel="best val loss")
    fig.suptitle("Val loss against each hyperparameter (colour: trial number; red ring: baseline)")
    return _save(fig, path)


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """Rows not dominated in (best_val_loss, runtime_s), both minimised, sorted by runtime."""
    pts = points.sort_values(["runtime_s", "best_val_loss"])
    return pts[pts["best_val_loss"] < pts["best_val_loss"].cummin().shift(fill_value=float("inf"))]


def plot_loss_vs_runtime(trials: pd.DataFrame, path: Path) -> Path:
    done = trials[(trials["state"] == "COMPLETE")].dropna(subset=["runtime_s", "best_val_loss"])
    front = pareto_front(done)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter(done["runtime_s"], done["best_val_loss"], c="tab:blue", s=40, label="completed trial")
    ax.step(front["runtime_s"], front["best_val_loss"], where="post", color="tab:red", lw=1.5, marker="o",
            label="Pareto front")
    base = done[done["baseline"]]
    if len(base):
        ax.scatter(base["runtime_s"], base["best_val_loss"], s=160, facecolors="none", edgecolors="black",
                   label="baseline")
    ax.set(xlabel="training runtime (s)", ylabel="best val loss", title="Val loss against runtime")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_parallel(study: optuna.Study, path: Path) -> Path:
    """Optuna's parallel-coordinate plot of the completed trials."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(study, params=list(SEARCHED), target=target,
                                                                      target_name="best val loss")
    fig = ax.figure
    fig.set_size_inches(11, 5)
    return _save(fig, path)
