"""The loss-curve figure (train/metrics.py): log-scale loss with the train loss smoothed and as logged, the
held-out loss at every evaluation, exact match and learning rate panels; metrics a run never logged are left
out, not drawn empty."""

import json
import math

import pytest

from train.metrics import (loss_curve_figure, metric_series, plot_loss_curve, read_metrics, smooth,
                           smoothing_halfwidth)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _sft_run(path, steps=60, eval_every=10):
    """What the trainer writes: an evaluation before training, train/* every step, an evaluation (held-out
    loss and exact match) every `eval_every` steps and at the end; one NaN step (written as null)."""
    records = [{"step": 0, "eval/loss": 137.0, "eval/masked_ce": 130.0, "eval/exact_match": 0.0}]
    for s in range(1, steps + 1):
        loss = None if s == 7 else 100.0 * math.exp(-s / 8) + 0.2 + 0.05 * (-1) ** s
        records.append({"step": s, "train/loss": loss, "train/lr": 3e-3 * (1 - s / (2 * steps)),
                        "train/grad_norm": 1.0})
        if s % eval_every == 0:
            records.append({"step": s, "eval/loss": 90.0 * math.exp(-s / 8) + 0.3, "eval/exact_match": s / 100})
    return _write(path, records)


def _by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def _panels(fig):
    return {ax.get_ylabel(): ax for ax in fig.axes}


def test_every_panel_is_drawn_with_the_loss_on_a_log_scale(tmp_path):
    path = _sft_run(tmp_path / "metrics.jsonl")
    records = read_metrics(path)
    fig = loss_curve_figure(records)
    panels = _panels(fig)
    assert list(panels) == ["masked-diffusion loss", "exact match", "learning rate"]
    loss, match, lr = panels.values()
    assert loss.get_yscale() == "log"
    assert all(ax.get_shared_x_axes().joined(loss, ax) for ax in (match, lr))  # one step axis

    lines = _by_label(loss)
    steps, values = metric_series(records, "train/loss")
    assert len(steps) == 59 and 7 not in steps  # the null (non-finite) step is left out
    raw = lines["train (as logged)"]
    assert list(raw.get_xdata()) == steps and list(raw.get_ydata()) == values
    assert raw.get_alpha() < 0.5  # drawn faint under the smoothed curve
    half = smoothing_halfwidth(len(steps))
    assert half == 1
    smoothed = lines["train (centred geometric mean of 3 points)"]
    # the definition, written out: the geometric mean of each point and its neighbours (one at the ends)
    expected = [(values[0] * values[1]) ** (1 / 2)]
    expected += [(values[i - 1] * values[i] * values[i + 1]) ** (1 / 3) for i in range(1, len(values) - 1)]
    expected += [(values[-2] * values[-1]) ** (1 / 2)]
    assert list(smoothed.get_xdata()) == steps
    assert list(smoothed.get_ydata()) == pytest.approx(expected, rel=1e-12)
    assert max(abs(a - b) for a, b in zip(expected, values)) > 0.01  # it does smooth

    held = lines["held-out (every evaluation)"]
    assert list(held.get_xdata()) == [0, 10, 20, 30, 40, 50, 60]
    assert held.get_ydata()[0] == 137.0

    (em,) = match.get_lines()
    assert list(em.get_xdata()) == [0, 10, 20, 30, 40, 50, 60]
    assert list(em.get_ydata()) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    (rate,) = lr.get_lines()
    assert list(rate.get_xdata()) == list(range(1, 61)) and rate.get_ydata()[0] == pytest.approx(3e-3 * (1 - 1 / 120))


def test_the_png_is_written_where_the_readme_says(tmp_path):
    path = _sft_run(tmp_path / "metrics.jsonl")
    out = plot_loss_curve(path, tmp_path / "loss_curve.png")
    assert out == tmp_path / "loss_curve.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_pretraining_run_has_no_exact_match_panel(tmp_path):
    records = [{"step": 0, "eval/loss": 11.0}] + [
        {"step": s, "train/loss": 10.0 / s, "train/lr": 1e-3} for s in range(1, 11)] + [{"step": 10, "eval/loss": 2.0}]
    fig = loss_curve_figure(records)
    assert list(_panels(fig)) == ["masked-diffusion loss", "learning rate"]
    assert fig.axes[0].get_yscale() == "log"


def test_one_logged_step_and_no_lr_still_plot(tmp_path):
    # a one-step run logged by hand (no train/lr): one point each, drawn with a marker
    path = _write(tmp_path / "metrics.jsonl", [{"step": 0, "eval/loss": 5.0}, {"step": 1, "train/loss": 4.0},
                                               {"step": 1, "eval/loss": 3.0}])
    fig = loss_curve_figure(read_metrics(path))
    assert list(_panels(fig)) == ["masked-diffusion loss"]
    lines = _by_label(fig.axes[0])
    (train,) = [line for label, line in lines.items() if label.startswith("train")]  # too few to smooth
    assert train.get_label() == "train" and list(train.get_ydata()) == [4.0] and train.get_marker() == "o"
    assert plot_loss_curve(path, tmp_path / "loss_curve.png").is_file()
    # nothing to plot: no file, None
    empty = _write(tmp_path / "empty.jsonl", [{"step": 0, "eval/exact_match": 0.5}])
    assert plot_loss_curve(empty, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_a_resumed_run_keeps_the_last_value_of_a_repeated_step_and_skips_are_marked():
    records = [{"step": s, "train/loss": 1.0, "train/skipped_steps": 0} for s in (1, 2, 3)]
    records += [{"step": 3, "train/loss": 2.0, "train/skipped_steps": 1}, {"step": 4, "train/loss": 1.5,
                                                                          "train/skipped_steps": 1}]
    assert metric_series(records, "train/loss") == ([1, 2, 3, 4], [1.0, 1.0, 2.0, 1.5])
    fig = loss_curve_figure(records)
    marks = _by_label(fig.axes[0])["skipped step(s) (non-finite)"]
    assert list(marks.get_xdata()) == [3, 3]  # a vertical line at step 3 only


def test_smoothing_window():
    assert smooth([1.0, 2.0, 3.0], 0) == [1.0, 2.0, 3.0]
    assert smooth([1.0, 100.0, 10000.0, 1.0], 1) == pytest.approx([10.0, 100.0, 100.0, 100.0])
    assert smooth([8.0, 1.0, 1.0, 1.0, 1.0], 2) == pytest.approx([2.0, 8 ** 0.25, 8 ** 0.2, 1.0, 1.0])
    assert [smoothing_halfwidth(n) for n in (1, 14, 30, 60, 1400)] == [0, 0, 1, 2, 35]
