"""Metrics sinks: console, JSONL, TensorBoard, optional Weights & Biases, and a loss-curve figure (PNG) at the end.

The trainer hands plain Python floats here, only every `logging_steps`, so logging never forces an
extra device synchronisation.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class MetricsLogger:
    def __init__(self, output_dir: str, cfg: DictConfig | None = None, *, append: bool = False):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self._jsonl = open(self.jsonl_path, "a" if append else "w")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        except ImportError:  # tensorboard is a pinned dependency; a broken install only loses this sink
            self._tb = None
        self._wandb = None
        if cfg is not None and cfg.wandb.enabled:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("wandb.enabled=true but wandb is not installed: pip install wandb") from None
            self._wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name,
                                     config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# Metrics the loss-curve figure draws; each panel is left out when its metric was never logged.
TRAIN_LOSS, HELDOUT_LOSS, EXACT_MATCH, LEARNING_RATE, SKIPPED = (
    "train/loss", "eval/loss", "eval/exact_match", "train/lr", "train/skipped_steps")


def metric_series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric in step order, non-finite (null) values left out. A step logged twice
    (a resumed run appends to metrics.jsonl and repeats the steps after its checkpoint) keeps its last value."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def smoothing_halfwidth(n_points: int) -> int:
    """Half the width of the train-loss smoothing window, in logged points: the window holds about a twentieth
    of the curve, so a run logged every step (noisy points) is smoothed, and one logged every 100 steps (each
    point already the mean of 100 steps) over 14 points is left as it is."""
    return round(n_points / 40)


def smooth(values: list[float], halfwidth: int) -> list[float]:
    """Centred moving geometric mean: s_i = exp(mean of log x_j over |j - i| <= halfwidth), the window cut
    at the ends (there it holds the points that exist). Centred, so the curve does not lag the loss (the
    figure is drawn after the run); geometric, so it is an ordinary moving average on the log axis drawn.
    halfwidth=0 returns the values unchanged."""
    logs = [math.log(max(x, 1e-30)) for x in values]
    out = []
    for i in range(len(logs)):
        window = logs[max(0, i - halfwidth):i + halfwidth + 1]
        out.append(math.exp(sum(window) / len(window)) if halfwidth else values[i])
    return out


def loss_curve_figure(records: list[dict]):
    """The figure `plot_loss_curve` writes, from metrics.jsonl records; None when no loss was logged.

    Panels, sharing the step axis: the loss on a log scale (train loss faint as logged, the same smoothed by
    `smooth` over 2 * `smoothing_halfwidth` + 1 points, and the held-out loss at every evaluation; steps
    skipped by divergence.action=skip as vertical marks), then held-out exact match and the learning rate,
    each only when the run logged it (a pretraining run has no exact match). A plain matplotlib Figure, made
    without pyplot: no backend is switched and nothing needs closing."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    train, held = metric_series(records, TRAIN_LOSS), metric_series(records, HELDOUT_LOSS)
    match, lr = metric_series(records, EXACT_MATCH), metric_series(records, LEARNING_RATE)
    if not train[0] and not held[0]:
        return None
    panels = ["loss"] + (["exact_match"] if match[0] else []) + (["lr"] if lr[0] else [])
    ratios = {"loss": 3.0, "exact_match": 1.3, "lr": 1.0}
    fig = Figure(figsize=(8, 1.2 + 1.6 * sum(ratios[p] for p in panels)), dpi=110)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [ratios[p] for p in panels]})
    axes = dict(zip(panels, axes[:, 0]))

    ax = axes["loss"]
    ax.set_yscale("log")
    mark = "o" if len(train[0]) == 1 else None  # one logged step: a point, not an invisible line
    if train[0]:
        half = smoothing_halfwidth(len(train[0]))
        if half:
            ax.plot(*train, color="C0", alpha=0.3, lw=0.8, label="train (as logged)")
            ax.plot(train[0], smooth(train[1], half), color="C0", lw=1.8,
                    label=f"train (centred geometric mean of {2 * half + 1} points)")
        else:  # too few points to smooth: each is usually the mean of a logging window already
            ax.plot(*train, color="C0", lw=1.8, marker=mark, ms=4, label="train")
    if held[0]:
        ax.plot(*held, "o-", color="C1", lw=1.2, ms=4, label="held-out (every evaluation)")
    steps, counts = metric_series(records, SKIPPED)  # cumulative: a mark where it grew
    grew = [s for s, c, before in zip(steps, counts, [0.0] + counts) if c > before]
    for i, step in enumerate(grew):
        ax.axvline(step, color="C3", alpha=0.4, lw=0.8, label=None if i else "skipped step(s) (non-finite)")
    ax.set_ylabel("masked-diffusion loss")
    ax.set_title("loss (log scale)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)

    if "exact_match" in axes:
        ax = axes["exact_match"]
        ax.plot(*match, "o-", color="C2", lw=1.2, ms=4)
        ax.set_ylim(-0.03, 1.03)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel("exact match")
        ax.set_title("held-out exact match", fontsize=10)
        ax.grid(alpha=0.3)
    if "lr" in axes:
        ax = axes["lr"]
        ax.plot(*lr, color="C4", lw=1.2, marker="o" if len(lr[0]) == 1 else None, ms=3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.set_ylabel("learning rate")
        ax.set_title("learning rate", fontsize=10)
        ax.grid(alpha=0.3)
    axes[panels[-1]].set_xlabel("step")
    fig.tight_layout()
    return fig


def plot_loss_curve(jsonl_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Write `loss_curve_figure` of a metrics.jsonl to png_path; None (nothing written) when no loss was logged."""
    fig = loss_curve_figure(read_metrics(jsonl_path))
    if fig is None:
        return None
    fig.savefig(png_path)
    return Path(png_path)
