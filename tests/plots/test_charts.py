"""Training curves: epochs are whole numbers on the axis."""

from __future__ import annotations

from cnnvis.plots.charts import training_curves_figure, training_curves_plot


def test_training_curves_tick_only_whole_epochs() -> None:
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5 + e / 10,
                "val_accuracy": 0.4 + e / 10} for e in (1, 2, 3)]
    fig = training_curves_plot(history)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert training_curves_figure(history)[:8] == b"\x89PNG\r\n\x1a\n"
    assert training_curves_figure([{"epoch": 0, "test_accuracy": 0.1}]) is None
