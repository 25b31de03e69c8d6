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


def test_titles_wrap_between_words_inside_the_figure_and_keep_short_parentheses_whole() -> None:
    from cnnvis.plots.base import TITLE_PT, text_width_in, wrap

    title = ("guided backprop times upsampled Grad-CAM (Selvaraju et al. 2017) · layer layer4 · "
             "resnet_small, best.pt (epoch 108)")
    for width in (3.0, 4.6, 7.0):
        lines = wrap(title, width, TITLE_PT, bold=True)
        assert " ".join(lines) == title  # nothing lost, broken only at spaces
        assert all(text_width_in(line, TITLE_PT, bold=True) <= width for line in lines), (width, lines)
        assert any("(Selvaraju et al. 2017)" in line for line in lines)
        assert any("(epoch 108)" in line for line in lines)
    wide = "W" * 10 + " " + "W" * 10
    assert wrap(wide, 2.0, TITLE_PT, bold=True) == ["W" * 10, "W" * 10]  # wide letters measured, not guessed
