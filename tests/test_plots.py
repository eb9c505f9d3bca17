"""The report's figures read back from their axes: categories as categories, pruned trials shown, no grid in the way."""
from __future__ import annotations

import numpy as np
import optuna
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from reports.collect import trials_table
from reports.plots import PRUNED_LABEL, _log_ticks, plot_parallel, plot_param_slices, search_space

# a small space of the presets' kinds: n_head, n_embd, block_size are choices; learning_rate is log-scaled
CPU_SPACE = {"max_iters": IntDistribution(500, 2000, step=250), "block_size": CategoricalDistribution((32, 48, 64)),
             "n_head": CategoricalDistribution((2, 4, 8)), "n_embd": CategoricalDistribution((64, 96, 128)),
             "dropout": FloatDistribution(0.0, 0.2), "learning_rate": FloatDistribution(5e-4, 5e-3, log=True)}
PRUNED_LOSS = 3.1  # the pruned trial's last report, at step 250


def tiny_study(space=CPU_SPACE) -> optuna.Study:
    """The baseline and two tuned trials completed, one trial pruned, one failed (dropout 0.2 only there)."""
    rows = [(TrialState.COMPLETE, 2.40, (2000, 64, 4, 128, 0.0, 1e-3)),
            (TrialState.COMPLETE, 2.60, (1000, 32, 2, 64, 0.1, 3e-3)),
            (TrialState.COMPLETE, 2.50, (1500, 48, 8, 96, 0.05, 6e-4)),
            (TrialState.PRUNED, None, (500, 32, 2, 96, 0.15, 4e-3)),
            (TrialState.FAIL, None, (750, 64, 8, 64, 0.2, 2e-3))]
    study = optuna.create_study(study_name="tiny", storage=optuna.storages.InMemoryStorage())
    for number, (state, value, values) in enumerate(rows):
        study.add_trial(create_trial(
            state=state, value=value, params=dict(zip(space, values)), distributions=space,
            intermediate_values={250: PRUNED_LOSS} if state == TrialState.PRUNED else {},
            user_attrs={"baseline": number == 0}))
    return study


def figure_of(plot, study: optuna.Study):
    return plot(trials_table(study), search_space(study))


def slice_axes(fig) -> dict:
    return {ax.get_xlabel(): ax for ax in fig.axes if ax.get_visible()}


@pytest.fixture(scope="module")
def slices():
    return figure_of(plot_param_slices, tiny_study())


@pytest.fixture(scope="module")
def coordinates():
    return figure_of(plot_parallel, tiny_study())


def points(ax) -> np.ndarray:
    return np.concatenate([c.get_offsets() for c in ax.collections])


def tick_labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels()]


def legend_labels(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_categorical_hyperparameters_are_plotted_as_their_categories(slices):
    axes = slice_axes(slices)
    assert tick_labels(axes["n_head"].xaxis) == ["2", "4", "8"]
    assert tick_labels(axes["block_size"].xaxis) == ["32", "48", "64"]
    assert tick_labels(axes["n_embd"].xaxis) == ["64", "96", "128"]


def test_a_hyperparameter_the_space_makes_numeric_is_plotted_on_a_continuous_axis():
    fig = figure_of(plot_param_slices, tiny_study({**CPU_SPACE, "n_head": IntDistribution(2, 8)}))
    assert set(points(slice_axes(fig)["n_head"])[:, 0]) == {2, 4, 8}  # at their values, not at category positions


def test_learning_rate_is_on_a_log_axis_only_when_searched_on_a_log_scale(slices):
    assert slice_axes(slices)["learning_rate"].get_xscale() == "log"
    linear = figure_of(plot_param_slices, tiny_study({**CPU_SPACE, "learning_rate": FloatDistribution(5e-4, 5e-3)}))
    assert slice_axes(linear)["learning_rate"].get_xscale() == "linear"


@pytest.mark.parametrize("lo, hi, expected", [(2.2e-3, 5.6e-3, None), (5e-4, 5e-3, [5e-4, 1e-3, 2e-3, 5e-3]),
                                                 (1e-4, 1e-2, [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2])])
def test_a_log_axis_gets_a_few_readable_ticks_however_narrow_its_range(lo, hi, expected):
    ax = Figure().subplots()
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    _log_ticks(ax.xaxis)
    visible = [t for t in ax.xaxis.get_majorticklocs() if lo <= t <= hi]
    if expected is None:  # under one 1-2-5 tick: a few round ones, not matplotlib's crowd of linear ticks
        assert 2 <= len(visible) <= 4, visible
    else:
        assert visible == pytest.approx(expected)


def test_pruned_trials_appear_in_the_slices_at_their_last_reported_loss_and_look_apart(slices):
    axes = slice_axes(slices)
    assert [0.15, PRUNED_LOSS] in points(axes["dropout"]).tolist()
    pruned = next(c for c in axes["dropout"].collections if PRUNED_LOSS in c.get_offsets()[:, 1])
    completed = next(c for c in axes["dropout"].collections if 2.60 in c.get_offsets()[:, 1])
    assert to_hex(pruned.get_facecolor()[0]) != to_hex(completed.get_facecolor()[0])
    assert PRUNED_LABEL in legend_labels(slices)
    x, _ = next(p for p in points(axes["n_head"]) if p[1] == PRUNED_LOSS)
    assert x == pytest.approx(0, abs=0.2)  # in the n_head=2 strip


def test_failed_trials_stay_out_of_the_slices_and_the_coordinates(slices, coordinates):
    assert 0.2 not in points(slice_axes(slices)["dropout"])[:, 0]
    host = coordinates.axes[0]
    assert sum(len(c.get_segments()) for c in host.collections) == 4  # three completed, one pruned


def test_parallel_coordinates_draw_no_grid_lines(coordinates):
    for ax in coordinates.axes:
        assert not any(line.get_visible() for line in ax.get_xgridlines() + ax.get_ygridlines())


def test_parallel_coordinates_label_each_axis_in_its_kind(coordinates):
    axes = {ax.get_label(): ax for ax in coordinates.axes}
    assert tick_labels(coordinates.axes[0].xaxis) == [*CPU_SPACE, "val loss"]
    assert tick_labels(axes["n_head"].yaxis) == ["2", "4", "8"]
    assert tick_labels(axes["block_size"].yaxis) == ["32", "48", "64"]
    assert axes["learning_rate"].get_yscale() == "log"
    assert axes["max_iters"].get_ylim() == (500, 2000)  # the searched range


def test_parallel_coordinates_draw_pruned_trials_dashed_to_their_last_reported_loss(coordinates):
    host, loss_axis = coordinates.axes[0], next(ax for ax in coordinates.axes if ax.get_label() == "loss_reached")
    pruned = next(c for c in host.collections if c.get_linestyle()[0][1] is not None)  # dashed
    [segment] = pruned.get_segments()
    lo, hi = loss_axis.get_ylim()
    assert lo + segment[-1, 1] * (hi - lo) == pytest.approx(PRUNED_LOSS)
    assert PRUNED_LABEL in legend_labels(coordinates)
