"""Optimizers (AdamW, Adafactor) and learning-rate schedules (linear warmup, then cosine/linear/constant)."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Norm scales (1-D tensors) are not decayed, as is usual for transformer training. Decoder weights
    # stacked for scan (model.remat.scan_layers) carry one extra, leading, layer dimension.
    stacked = model.stacked_parameter_names() if hasattr(model, "stacked_parameter_names") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            ndim = param.ndim - (name in stacked)
            (decay if ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    groups = _param_groups(model, float(opt.weight_decay))
    if opt.type == "adamw":
        beta1, beta2 = (float(b) for b in opt.betas)
        # capturable keeps the step counter on the device (no host read per parameter on XLA);
        # foreach=False keeps the update as plain per-tensor ops, which torch_xla traces into the step graph.
        on_device = next(model.parameters()).device.type != "cpu"  # capturable is refused on CPU tensors
        return torch.optim.AdamW(groups, lr=float(opt.learning_rate), betas=(beta1, beta2),
                                 eps=float(opt.eps), foreach=False, capturable=on_device)
    if opt.type == "adafactor":
        return torch.optim.Adafactor(groups, lr=float(opt.learning_rate), foreach=False)
    raise ValueError(f"optimizer.type: unknown value {opt.type!r}; allowed: adamw, adafactor")


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state (zeros, step 0) up front, as its first step would.

    torch.optim creates state lazily inside the first step, so that step traces a different graph from
    every later one and torch_xla compiles twice; with the state present from the start, step 1 already
    runs the steady-state graph. Other optimizers keep their lazy initialisation.
    """
    if not isinstance(optimizer, torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad and not optimizer.state[param]:
                optimizer.state[param] = {
                    "step": torch.zeros((), dtype=torch.float32, device=param.device),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }


def lr_multiplier(step: int, *, kind: str, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate for the update that follows `step` completed updates."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler.type: unknown value {kind!r}; allowed: cosine, linear, constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig) -> torch.optim.lr_scheduler.LambdaLR:
    sched = cfg.lr_scheduler
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, kind=sched.type, warmup_steps=int(sched.warmup_steps),
                                   total_steps=int(cfg.max_steps), min_ratio=float(sched.min_lr_ratio)),
    )
