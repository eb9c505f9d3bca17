"""The report's figures (history, loss curves, importance, slices, runtime, coordinates); `save` writes one to a PNG."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.ticker as ticker
import numpy as np
import optuna
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from optuna.distributions import BaseDistribution, CategoricalDistribution

from study.space import SEARCHED

sns.set_theme(style="whitegrid", context="notebook")
STATE_STYLE = {"COMPLETE": ("tab:blue", "o"), "PRUNED": ("tab:orange", "v"), "FAIL": ("tab:red", "X")}
PRUNED_ALPHA = 0.5
PRUNED_LABEL = "pruned (val loss at its last eval)"


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def search_space(study: optuna.Study) -> dict[str, BaseDistribution]:
    """Each searched hyperparameter's distribution as the study's trials recorded it (a later trial's wins)."""
    space = {}
    for t in study.get_trials(deepcopy=False):
        space.update(t.distributions)
    return {name: space[name] for name in SEARCHED if name in space}


def loss_reached(trials: pd.DataFrame) -> pd.DataFrame:
    """Completed and pruned trials, with `loss_reached`: the best val loss, or a pruned trial's last report."""
    rows = trials[trials["state"].isin(["COMPLETE", "PRUNED"])]
    loss = rows["best_val_loss"].where(rows["state"] == "COMPLETE", rows["last_reported_val_loss"])
    return rows.assign(loss_reached=loss).dropna(subset=["loss_reached"])


def categories(dist: BaseDistribution | None, values: pd.Series) -> list | None:
    """A categorical parameter's values in order (its choices and any a trial holds); None for a numeric one."""
    if not isinstance(dist, CategoricalDistribution):
        return None
    return sorted(set(dist.choices) | set(values.dropna()))


def label(value) -> str:
    """A category as a reader writes it: 2 (also for 2.0), 0.1, 0.0005."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _log_ticks(axis: Axis) -> None:
    """Ticks at 1, 2 and 5 times powers of ten, written plainly (0.002): a searched range spans a decade or two.

    Over a narrower range, where fewer than two such ticks fall, a few round ones instead (matplotlib's LogLocator
    would fill the axis with crowded linear ticks).
    """
    axis.axes.autoscale_view()
    lo, hi = sorted(axis.get_view_interval())
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10.0 ** e for e in decades for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    axis.set_major_locator(ticker.FixedLocator(ticks) if len(ticks) >= 2 else ticker.MaxNLocator(3))
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _legend(fig: Figure, points: pd.DataFrame, completed: Line2D, pruned: Line2D, baseline: Line2D) -> None:
    """One legend under the figure, naming those of completed trials, pruned ones and the baseline it shows."""
    shown = [points["state"].eq("COMPLETE").any(), points["state"].eq("PRUNED").any(), points["baseline"].any()]
    handles = [h for h, show in zip((completed, pruned, baseline), shown) if show]
    fig.legend(handles=handles, loc="outside lower center", ncols=max(len(handles), 1), fontsize="small")


def plot_history(trials: pd.DataFrame) -> Figure:
    """Val loss per trial with the best-so-far line; pruned trials at their last report, failed ones at the top."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
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
    return fig


def plot_loss_curves(curves: dict[str, pd.DataFrame]) -> Figure:
    """Train (dashed) and val (solid) loss against iteration, one colour per configuration."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for (name, df), color in zip(curves.items(), sns.color_palette("deep")):
        ax.plot(df["step"], df["val_loss"], color=color, lw=2, label=f"{name} val")
        ax.plot(df["step"], df["train_loss"], color=color, lw=1.2, ls="--", label=f"{name} train")
    ax.set(xlabel="iteration", ylabel="loss", title="Loss curves: baseline vs tuned")
    ax.legend(fontsize="small")
    return fig


def plot_importance(importance: pd.Series) -> Figure:
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    sns.barplot(x=importance.values, y=importance.index, ax=ax, color="tab:blue")
    ax.set(xlabel="share of val loss variation", ylabel="", title="Hyperparameter importance")
    return fig


def _slice(ax: Axes, points: pd.DataFrame, name: str, dist: BaseDistribution) -> None:
    """Val loss against one hyperparameter: a strip per category, or a scatter on a (log) continuous axis."""
    points = points.dropna(subset=[name])
    order = categories(dist, points[name])
    x = points[name] if order is None else points[name].map(label)
    base = points["baseline"]
    for state in ("PRUNED", "COMPLETE"):  # completed trials over pruned ones
        color, marker = STATE_STYLE[state]
        style = dict(color=color, marker=marker, alpha=PRUNED_ALPHA if state == "PRUNED" else 0.9)
        for rows, jitter in ((~base, 0.15), (base, False)):  # the baseline unjittered, inside its ring
            rows = rows & (points["state"] == state)
            if not rows.any():
                continue
            if order is None:
                ax.scatter(x[rows], points.loc[rows, "loss_reached"], s=40, **style)
            else:
                sns.stripplot(x=x[rows], y=points.loc[rows, "loss_reached"], order=[label(v) for v in order],
                              jitter=jitter, size=6.5, ax=ax, **style)
    if base.any():
        at = points.loc[base, name] if order is None else [order.index(v) for v in points.loc[base, name]]
        ax.scatter(at, points.loc[base, "loss_reached"], s=150, facecolors="none", edgecolors="red", lw=1.5, zorder=4)
    if order is not None:
        ax.set_xlim(-0.5, len(order) - 0.5)  # as the strips set it, before the ring's autoscaling
    elif getattr(dist, "log", False):
        ax.set_xscale("log")
        _log_ticks(ax.xaxis)
    ax.set(xlabel=name, ylabel="")


def plot_param_slices(trials: pd.DataFrame, space: dict[str, BaseDistribution]) -> Figure:
    """Val loss against each hyperparameter: completed trials, pruned ones at their last report, baseline ringed."""
    points = loss_reached(trials)
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    axes = fig.subplots(max(1, math.ceil(len(space) / 3)), 3, sharey=True, squeeze=False)
    for ax, (name, dist) in zip(axes.flat, space.items()):
        _slice(ax, points, name, dist)
    for ax in axes.flat[len(space):]:
        ax.set_visible(False)
    (done_color, done_marker), (pruned_color, pruned_marker) = STATE_STYLE["COMPLETE"], STATE_STYLE["PRUNED"]
    _legend(fig, points, Line2D([], [], ls="", color=done_color, marker=done_marker, label="completed"),
            Line2D([], [], ls="", color=pruned_color, marker=pruned_marker, alpha=PRUNED_ALPHA, label=PRUNED_LABEL),
            Line2D([], [], ls="", marker="o", ms=11, mfc="none", mec="red", label="baseline"))
    fig.supylabel("val loss")
    fig.suptitle("Val loss against each hyperparameter")
    return fig


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """Rows not dominated in (best_val_loss, runtime_s), both minimised, sorted by runtime."""
    pts = points.sort_values(["runtime_s", "best_val_loss"])
    return pts[pts["best_val_loss"] < pts["best_val_loss"].cummin().shift(fill_value=float("inf"))]


def plot_loss_vs_runtime(trials: pd.DataFrame) -> Figure:
    done = trials[(trials["state"] == "COMPLETE")].dropna(subset=["runtime_s", "best_val_loss"])
    front = pareto_front(done)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(done["runtime_s"], done["best_val_loss"], c="tab:blue", s=40, label="completed trial")
    ax.step(front["runtime_s"], front["best_val_loss"], where="post", color="tab:red", lw=1.5, marker="o",
            label="Pareto front")
    base = done[done["baseline"]]
    if len(base):
        ax.scatter(base["runtime_s"], base["best_val_loss"], s=160, facecolors="none", edgecolors="black",
                   label="baseline")
    ax.set(xlabel="training runtime (s)", ylabel="best val loss", title="Val loss against runtime")
    ax.legend(fontsize="small")
    return fig


def _coordinate(ax: Axes, values: pd.Series, dist: BaseDistribution | None) -> pd.Series:
    """Give one vertical axis its scale, limits and ticks; return the values placed on it, in [0, 1]."""
    order = categories(dist, values)
    if order is not None:
        ax.set_yticks(range(len(order)), [label(v) for v in order])
        values, lo, hi = values.map({v: i for i, v in enumerate(order)}), 0, max(len(order) - 1, 1)
    else:  # a numeric axis spans the searched range (and any value outside it)
        lo, hi = values.min(), values.max()
        if dist is not None:
            lo, hi = min(lo, dist.low), max(hi, dist.high)
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        ax.yaxis.set_major_locator(ticker.MaxNLocator(5, steps=[1, 2, 2.5, 5, 10]))
    log = getattr(dist, "log", False)
    if log:
        ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    if log:  # ticks chosen for the limits just set
        _log_ticks(ax.yaxis)
    scale = np.log10 if log else (lambda v: v)
    return (scale(values) - scale(lo)) / (scale(hi) - scale(lo))


def plot_parallel(trials: pd.DataFrame, space: dict[str, BaseDistribution]) -> Figure:
    """One line per trial across the hyperparameters to its val loss; pruned trials dashed, at their last report."""
    points = loss_reached(trials)
    coords = {**space, "loss_reached": None}
    fig = Figure(figsize=(11, 5.5), layout="constrained")
    with sns.axes_style("ticks"):  # tick marks on every axis, no grid lines across the lines
        host = fig.subplots()
        placed = pd.DataFrame(index=points.index)
        for i, (name, dist) in enumerate(coords.items()):
            ax = host.twinx()
            ax.set_label(name)  # names the axis for a reader of fig.axes
            placed[name] = _coordinate(ax, points[name], dist)
            ax.spines["right"].set_position(("axes", i / (len(coords) - 1)))
            sns.despine(ax=ax, left=True, bottom=True, right=False)
    host.set(xlim=(0, len(coords) - 1), ylim=(0, 1), yticks=[])
    host.set_xticks(range(len(coords)), [*space, "val loss"])
    host.tick_params(axis="x", length=0, pad=14)  # names below the lowest tick labels
    sns.despine(ax=host, left=True, bottom=True)
    x = np.arange(len(coords))
    done, pruned = points["state"] == "COMPLETE", points["state"] == "PRUNED"
    pruned_color = STATE_STYLE["PRUNED"][0]
    host.add_collection(LineCollection([np.column_stack([x, y]) for y in placed[pruned].to_numpy()],
                                       colors=pruned_color, linestyles="--", alpha=PRUNED_ALPHA, lw=1))
    cmap = sns.color_palette("crest_r", as_cmap=True)  # darker: lower loss
    loss = placed.loc[done, "loss_reached"]
    host.add_collection(LineCollection([np.column_stack([x, y]) for y in placed[done].to_numpy()],
                                       array=loss, cmap=cmap, clim=(loss.min(), loss.max()), lw=1.5))
    base = placed[points["baseline"]]
    if len(base):
        host.plot(x, base.iloc[0], color="red", lw=2)
    _legend(fig, points, Line2D([], [], color=cmap(0.2), lw=1.5, label="completed (darker: lower val loss)"),
            Line2D([], [], color=pruned_color, ls="--", alpha=PRUNED_ALPHA, label=PRUNED_LABEL),
            Line2D([], [], color="red", lw=2, label="baseline"))
    fig.suptitle("Parallel coordinates")
    return fig
