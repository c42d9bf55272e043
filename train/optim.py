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


class _StepCounted(torch.optim.Optimizer):
    """What our optimizers share: state created on a parameter's first update (init_state), a step count
    per parameter kept on the host, the optional closure."""

    def init_state(self, param: torch.Tensor) -> dict:
        raise NotImplementedError

    @staticmethod
    def _closure_loss(closure):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _stepped(self, group: dict):
        """(parameter, its state, its step count after this update) for the group's parameters that have a
        gradient; the count is incremented here."""
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                state.update(self.init_state(param))
            state["step"] += 1
            yield param, state, float(state["step"])


class AdamW(_StepCounted):
    """AdamW (bias-corrected, decoupled weight decay), the same update as torch.optim.AdamW, written as
    a handful of multi-tensor ops per parameter group.

    Why our own: torch_xla traces the step on the host every step, and torch.optim.AdamW's fused
    helpers (lerp_, addcmul_, addcdiv_) are decomposed on the XLA device through torch's Python
    reference implementations: about 80 ms of host time per qwen3-tiny step, as long as the step's
    own execution on CPU. Here only plain elementwise foreach ops (mul, add, sqrt, div) are used.
    The step count stays on the host (a CPU tensor, as torch's non-capturable AdamW keeps it), so the
    learning rate and bias corrections enter the graph as scalars: torch_xla passes those as data, and
    the step graph compiles once. The state keys (step, exp_avg, exp_avg_sq) are torch's.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"optimizer: invalid AdamW settings lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def init_state(self, param: torch.Tensor) -> dict:
        return {"step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            # Parameters share a step count unless one went without a gradient; bias corrections are
            # per count, so parameters are updated in sets of equal counts (normally one set).
            by_count: dict[float, list[torch.Tensor]] = {}
            for param, _, count in self._stepped(group):
                by_count.setdefault(count, []).append(param)
            for count, params in by_count.items():
                grads = [p.grad for p in params]
                exp_avg = [self.state[p]["exp_avg"] for p in params]
                exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
                torch._foreach_mul_(exp_avg, beta1)
                torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
                torch._foreach_mul_(exp_avg_sq, beta2)
                torch._foreach_add_(exp_avg_sq, torch._foreach_mul(grads, grads), alpha=1 - beta2)
                # torch's m / (sqrt(v) / sqrt(c2) + eps) * lr / c1, with the bias corrections c1, c2 moved
                # into scalars that never become exactly 1: c2 = 1 - beta2**count rounds to 1.0 after ~700
                # steps, and torch_xla bakes the scalars 0 and 1 into the graph as constants (a recompile).
                root_c2 = math.sqrt(1 - beta2 ** count)
                denom = torch._foreach_sqrt(exp_avg_sq)
                torch._foreach_add_(denom, eps * root_c2)
                if weight_decay:
                    torch._foreach_mul_(params, 1 - lr * weight_decay)
                torch._foreach_add_(params, torch._foreach_div(exp_avg, denom),
                                    alpha=-lr * root_c2 / (1 - beta1 ** count))
        return loss


class Adafactor(_StepCounted):
    """torch.optim.Adafactor's update (same hyperparameters and state keys: step, row_var, col_var,
    variance), computed entirely on the device.

    Why our own: torch's reads two norms per parameter back to the host inside its step (`.item()` for
    the relative step size and for the update clipping). On XLA each read cuts the graph and waits for
    the device: a step becomes one compiled graph per parameter, and it cannot be traced ahead of time
    (train/aot.py). Here those norms stay tensors; the step count stays on the host, and the scalars
    derived from it enter the graph as device data (not as Python numbers, which torch_xla would bake
    in as constants when they are exactly 0 or 1, as 1 - beta2_t is at step 1: a second compile).

    Decoder weights stacked for scan (`stacked`, a set of parameters) get the update of each layer
    alone, as unstacked: the root-mean-squares that scale the step and clip the update are taken per
    layer, and the factored second moment is per layer already (rows and columns are the last two
    dimensions).
    """

    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8, eps=(None, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, stacked=()):
        if not lr >= 0 or not beta2_decay <= 0 or not d >= 1 or not weight_decay >= 0 or not eps[1] >= 0 \
                or (eps[0] is not None and not eps[0] >= 0):
            raise ValueError(f"optimizer: invalid Adafactor settings lr={lr}, beta2_decay={beta2_decay}, eps={eps}, "
                             f"d={d}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d,
                                      weight_decay=weight_decay))
        self._stacked = {id(p) for p in stacked}

    def init_state(self, param: torch.Tensor) -> dict:
        state = {"step": torch.zeros((), dtype=torch.float32)}
        if param.ndim - (id(param) in self._stacked) >= 2:  # factored: one row and one column statistic
            state["row_var"] = param.new_zeros(param.shape[:-1] + (1,))
            state["col_var"] = param.new_zeros(param.shape[:-2] + (1, param.shape[-1]))
        else:
            state["variance"] = torch.zeros_like(param)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure_loss(closure)
        scalars: dict = {}  # per step count, lr, device...: one host-to-device copy, not one per tensor
        for group in self.param_groups:
            lr, d, weight_decay = group["lr"], group["d"], group["weight_decay"]
            eps1, eps2 = group["eps"]
            for param, state, count in self._stepped(group):
                # 1 - beta2_t (the new statistics' weight) and the relative step size, as device scalars.
                key = (count, lr, group["beta2_decay"], param.device, param.dtype)
                if key not in scalars:
                    scalars[key] = torch.tensor([count ** group["beta2_decay"], min(lr, count ** -0.5)],
                                                dtype=param.dtype).to(param.device).unbind()
                w, rho = scalars[key]
                grad, tiny = param.grad, torch.finfo(param.dtype).eps if eps1 is None else eps1
                per = tuple(range(1, param.ndim)) if id(param) in self._stacked else tuple(range(param.ndim))
                rms = lambda t: t.square().mean(dim=per, keepdim=True).sqrt()  # noqa: E731  (per layer)
                alpha = rms(param).clamp(min=eps2) * rho
                if weight_decay:
                    param.mul_(1 - lr * weight_decay)
                if "row_var" in state:
                    row_var, col_var = state["row_var"], state["col_var"]
                    row_var.add_((grad.square().mean(dim=-1, keepdim=True) - row_var) * w)
                    col_var.add_((grad.square().mean(dim=-2, keepdim=True) - col_var) * w)
                    estimate = (row_var @ col_var) / row_var.mean(dim=-2, keepdim=True).clamp(min=tiny)
                else:
                    state["variance"].add_((grad.square() - state["variance"]) * w)
                    estimate = state["variance"]
                update = estimate.clamp(min=tiny * tiny).rsqrt() * grad
                param.sub_(update * (alpha / (rms(update) / d).clamp(min=1.0)))
        return loss


def build_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    groups = _param_groups(model, float(opt.weight_decay))
    if opt.type == "adamw":
        beta1, beta2 = (float(b) for b in opt.betas)
        return AdamW(groups, lr=float(opt.learning_rate), betas=(beta1, beta2), eps=float(opt.eps))
    if opt.type == "adafactor":
        stacked = model.stacked_parameter_names() if hasattr(model, "stacked_parameter_names") else set()
        return Adafactor(groups, lr=float(opt.learning_rate),
                         stacked=[p for n, p in model.named_parameters() if n in stacked])
    raise ValueError(f"optimizer.type: unknown value {opt.type!r}; allowed: adamw, adafactor")


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (zeros, step 0) up front, as its first step would.

    With the state created inside the first step, that step would trace a different graph from every
    later one and torch_xla would compile twice; with the state present from the start, step 1 already
    runs the steady-state graph.
    """
    if not isinstance(optimizer, _StepCounted):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad and not optimizer.state[param]:
                optimizer.state[param] = optimizer.init_state(param)


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
