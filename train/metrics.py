"""Metrics sinks: console, JSONL, TensorBoard, optional Weights & Biases, and a loss-curve PNG at the end.

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


def plot_loss_curve(jsonl_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Training loss (and held-out loss where present) against step; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(jsonl_path)
    train = [(r["step"], r["train/loss"]) for r in records if r.get("train/loss") is not None]
    held = [(r["step"], r["eval/loss"]) for r in records if r.get("eval/loss") is not None]
    if not train and not held:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train/loss", lw=1.2)
    if held:
        ax.plot(*zip(*held), "o-", label="eval/loss (held-out)", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("masked-diffusion loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
