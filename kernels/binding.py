"""torch side of the kernels: backend selection and one autograd.Function over call_jax.

Every JAX backend (reference, interpret, mosaic) is a registered pair of module-level functions
(see kernels/__init__.py). `_JaxOp` runs the pair inside the torch_xla graph:

- forward calls `call_jax(fwd, tensors, static)` and saves the inputs plus the residuals fwd
  returned (e.g. the attention log-sum-exp) for backward;
- backward calls `call_jax(bwd, (*tensors, *residuals, grad_out), static)`; it never re-runs the
  forward.

Caching: call_jax keys its trace cache on id(fn) plus, per entry, the input shapes/dtypes and the
values of every non-tensor argument (torch_xla 2.9 flattens (args, kwargs) with jax.tree and keeps
the non-tensor leaves in the key, passing them into the traced function as Python constants). So
static parameters go in the `kwargs` dict as plain hashable values and the function stays the
same module-level object: same shapes + same statics = no re-trace and the same HLO, so the
surrounding torch_xla graph hits its compilation cache too. A closure or functools.partial built
per call would have a fresh id and re-trace every time.
"""

from __future__ import annotations

import math
import os

import torch

from kernels import BACKENDS, get_backend
from kernels.naive import attention_naive, cross_entropy_naive

ENV_BACKEND = "PALLAS_DLM_BACKEND"
DEFAULT_BACKEND = "reference"


def _on_tpu() -> bool:
    try:
        import torch_xla.runtime as xr

        return xr.device_type() == "TPU"
    except Exception:  # no torch_xla runtime: certainly not TPU
        return False


def resolve_backend(backend: str | None = None) -> str:
    """Concrete backend name: explicit argument, else $PALLAS_DLM_BACKEND, else 'reference';
    'pallas' becomes 'mosaic' on TPU and 'interpret' elsewhere."""
    name = backend if backend is not None else os.environ.get(ENV_BACKEND) or DEFAULT_BACKEND
    name = str(name).strip().lower()
    if name not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_BACKEND}"
        raise ValueError(f"kernels: {source}={name!r} is unknown; allowed: {', '.join(BACKENDS)}")
    if name == "pallas":
        name = "mosaic" if _on_tpu() else "interpret"
    return name


def _call_jax(fn, args, kwargs):
    # Imported here: torch_xla must be imported (and its device created) by the caller's process
    # before CPU autograd runs, which the trainer and tests arrange; importing it lazily keeps
    # `import kernels` cheap for the naive path.
    from torch_xla.core import xla_builder as xb

    return xb.call_jax(fn, tuple(args), kwargs)


# Per-op residual convention, matching kernels.reference:
#   attention:     fwd -> (o, lse);        bwd(q, k, v, segment_ids, o, lse, do)
#   cross_entropy: fwd -> (loss_sum, lse); bwd(hidden, weight, targets, token_weight, lse, g)
_SAVES_OUTPUT = {"attention": True, "cross_entropy": False}


class _JaxOp(torch.autograd.Function):
    """Runs impl.fwd / impl.bwd through call_jax. Arguments: (impl, static, *tensors)."""

    @staticmethod
    def forward(ctx, impl, static, *tensors):
        outs = _call_jax(impl.fwd, tensors, static)
        if not isinstance(outs, (tuple, list)) or len(outs) < 1:
            raise TypeError(f"kernels: {impl.op}/{impl.name} fwd must return (out, *residuals)")
        out = outs[0]
        # Attention's backward needs its own output (rowsum(dO * O)), so o is saved with lse.
        residuals = tuple(outs) if _SAVES_OUTPUT[impl.op] else tuple(outs[1:])
        ctx.impl, ctx.static, ctx.num_tensors = impl, static, len(tensors)
        ctx.save_for_backward(*tensors, *residuals)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grads = _call_jax(ctx.impl.bwd, (*saved, grad_out.contiguous()), ctx.static)
        grads = tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
        # Tensors past the differentiable ones (segment_ids, targets, token_weight) get None.
        padded = grads + (None,) * (ctx.num_tensors - len(grads))
        padded = tuple(g if need else None for g, need in zip(padded, ctx.needs_input_grad[2:]))
        return (None, None, *padded)


def _static_kwargs(impl, block_sizes, **base):
    kwargs = dict(impl.static)
    kwargs.update(base)
    if impl.takes_block_sizes and block_sizes is not None:
        kwargs["block_sizes"] = _hashable(block_sizes)
    return kwargs


def _hashable(value):
    """Block sizes as hashable leaves (call_jax keys its cache on them)."""
    if isinstance(value, dict):
        return {k: _hashable(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    hash(value)
    return value


def _require_xla(name, op, *tensors):
    for t in tensors:
        if t.device.type != "xla":
            raise ValueError(
                f"kernels: {op} backend {name!r} runs through torch_xla and needs tensors on the "
                f"XLA device, got {t.device}; use backend='naive' for plain torch tensors")


def masked_attention(q, k, v, segment_ids, *, causal: bool = False, sm_scale: float | None = None,
                     backend: str | None = None, block_sizes=None):
    """Segment-masked (optionally causal) attention with GQA.

    q [B,Hq,L,D], k/v [B,Hkv,L,D], segment_ids [B,L] (0 = padding) -> o [B,Hq,L,D].
    A query attends only to keys of its own non-zero segment; padding queries give o = 0.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"masked_attention: bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"masked_attention: {q.shape[1]} query heads not a multiple of "
                         f"{k.shape[1]} key/value heads")
    if tuple(segment_ids.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"masked_attention: segment_ids {tuple(segment_ids.shape)} must be "
                         f"[B, L] = {(q.shape[0], q.shape[2])}")
    sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    segment_ids = segment_ids.to(torch.int32)
    name = resolve_backend(backend)
    if name == "naive":
        return attention_naive(q, k, v, segment_ids, causal=causal, sm_scale=sm_scale)
    impl = get_backend("attention", name)
    _require_xla(name, "attention", q, k, v, segment_ids)
    static = _static_kwargs(impl, block_sizes, causal=bool(causal), sm_scale=sm_scale)
    return _JaxOp.apply(impl, static, q, k, v, segment_ids)


def masked_cross_entropy(hidden, weight, targets, token_weight, *, backend: str | None = None,
                         block_sizes=None):
    """sum_i token_weight_i * (logsumexp_v(hidden_i . weight_v) - hidden_i . weight_{targets_i})
    over rows with token_weight > 0, as an fp32 scalar. hidden [N,H], weight [V,H], targets [N],
    token_weight [N]. Differentiable in hidden and weight (tied embeddings work)."""
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"masked_cross_entropy: hidden {tuple(hidden.shape)} must be [N, H] and "
                         f"weight {tuple(weight.shape)} [V, H]")
    n = hidden.shape[0]
    if tuple(targets.shape) != (n,) or tuple(token_weight.shape) != (n,):
        raise ValueError(f"masked_cross_entropy: targets {tuple(targets.shape)} and token_weight "
                         f"{tuple(token_weight.shape)} must be [N] = ({n},)")
    targets = targets.to(torch.int32)
    token_weight = token_weight.to(torch.float32)
    name = resolve_backend(backend)
    if name == "naive":
        return cross_entropy_naive(hidden, weight, targets, token_weight)
    impl = get_backend("cross_entropy", name)
    _require_xla(name, "cross_entropy", hidden, weight, targets, token_weight)
    static = _static_kwargs(impl, block_sizes)
    return _JaxOp.apply(impl, static, hidden, weight, targets, token_weight)
