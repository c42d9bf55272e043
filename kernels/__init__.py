"""Fused masked attention and masked cross-entropy for torch_xla (Pallas kernels + references).

Public API (torch tensors on the XLA device; see kernels/binding.py):
    masked_attention(q, k, v, segment_ids, *, causal=False, block_diffusion=False, sm_scale=None,
                     backend=None, block_sizes=None) -> o
    masked_cross_entropy(hidden, weight, targets, token_weight, *, backend=None,
                         block_sizes=None) -> loss_sum
    resolve_backend(backend) -> concrete backend name
    spmd_mesh() -> torch_xla's global mesh when running SPMD over several devices, else None

Backend registry (this module; torch-free so that the pure-JAX kernel modules can register
themselves and be tested without importing torch):
    register_backend(op, name, fwd, bwd, *, static=None, takes_block_sizes=True)
    get_backend(op, name) -> BackendImpl

The torch side is imported lazily for the same reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

OPS = ("attention", "cross_entropy")
# Backends that run JAX functions through call_jax (registered fwd/bwd pairs). "naive" is plain
# torch (kernels/naive.py) and "pallas" is an alias resolved per platform by the binding.
JAX_BACKENDS = ("reference", "interpret", "mosaic")
BACKENDS = ("pallas", "interpret", "mosaic", "reference", "naive")

# Where each op's Pallas implementation lives; imported on first use so it can register itself.
_PALLAS_MODULES = {
    "attention": "kernels.pallas_attention",
    "cross_entropy": "kernels.pallas_cross_entropy",
}


@dataclass(frozen=True)
class BackendImpl:
    """One op's forward/backward pair for one backend.

    fwd(*tensors, **static) -> (out, *extras); bwd(*tensors, *residuals, grad_out, **static)
    -> grads of the differentiable tensors, with the signatures of kernels.reference:
      attention:     fwd(q, k, v, segment_ids) -> (o, lse [B,Hq,L] fp32)
                     bwd(q, k, v, segment_ids, o, lse, do) -> (dq, dk, dv)
      cross_entropy: fwd(hidden, weight, targets, token_weight) -> (loss_sum, lse [N] fp32)
                     bwd(hidden, weight, targets, token_weight, lse, g) -> (d_hidden, d_weight)
    i.e. attention's residuals are (o, lse) (its output included), cross-entropy's are the
    extras after loss_sum. Static keywords: attention gets causal: bool, sm_scale: float;
    both get block_sizes=... when the caller gives one and takes_block_sizes is set. Both must be module-level functions (call_jax caches
    the traced computation by function identity). `static` holds fixed keyword arguments for this
    backend (e.g. {"interpret": True}); `takes_block_sizes` says whether `block_sizes=` is passed.
    """

    op: str
    name: str
    fwd: Callable[..., Any]
    bwd: Callable[..., Any]
    static: tuple[tuple[str, Any], ...] = field(default=())
    takes_block_sizes: bool = True


_REGISTRY: dict[tuple[str, str], BackendImpl] = {}


def register_backend(op: str, name: str, fwd, bwd, *, static: dict | None = None,
                     takes_block_sizes: bool = True) -> None:
    """Register (or replace) the fwd/bwd pair of `op` for backend `name` (a JAX backend).

    Example (in kernels/pallas_attention.py):
        register_backend("attention", "interpret", attn_fwd, attn_bwd, static={"interpret": True})
        register_backend("attention", "mosaic", attn_fwd, attn_bwd, static={"interpret": False})
    """
    if op not in OPS:
        raise ValueError(f"kernels: unknown op {op!r}; allowed: {', '.join(OPS)}")
    if name not in JAX_BACKENDS:
        raise ValueError(
            f"kernels: cannot register backend {name!r}; allowed: {', '.join(JAX_BACKENDS)}")
    for f in (fwd, bwd):
        if not callable(f):
            raise TypeError(f"kernels: {op}/{name}: {f!r} is not callable")
    items = tuple(sorted((static or {}).items()))
    for key, value in items:
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"kernels: {op}/{name}: static {key}={value!r} must be hashable") from None
    _REGISTRY[(op, name)] = BackendImpl(op, name, fwd, bwd, items, takes_block_sizes)


def get_backend(op: str, name: str) -> BackendImpl:
    """The registered pair for (op, name), importing the Pallas module on first use."""
    key = (op, name)
    if key not in _REGISTRY and name in ("interpret", "mosaic"):
        module = _PALLAS_MODULES[op]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the module exists but something it needs does not
                raise
    if key not in _REGISTRY:
        if name in ("interpret", "mosaic"):
            raise NotImplementedError(
                f"kernels: no Pallas {op} kernel is registered for backend {name!r} "
                f"({_PALLAS_MODULES[op]} missing or did not register); use backend='reference' "
                f"or 'naive'")
        raise ValueError(
            f"kernels: unknown backend {name!r} for {op}; allowed: {', '.join(BACKENDS)}")
    return _REGISTRY[key]


def available_backends(op: str) -> tuple[str, ...]:
    """Concrete backends that can run `op` now (imports the Pallas module if present)."""
    out = []
    for name in JAX_BACKENDS:
        try:
            get_backend(op, name)
            out.append(name)
        except NotImplementedError:
            pass
    return tuple(out) + ("naive",)


def _register_references() -> None:
    from kernels import reference as ref

    register_backend("attention", "reference", ref.attention_reference_fwd,
                     ref.attention_reference_bwd, takes_block_sizes=False)
    register_backend("cross_entropy", "reference", ref.cross_entropy_reference_fwd,
                     ref.cross_entropy_reference_bwd, takes_block_sizes=False)


_register_references()

# Block-diffusion (BD3-LM) attention. With block_diffusion=True the attention's `segment_ids` carry
# one int32 per position: (segment << BD_CODE_BITS) | code, 0 for padding, where code = 2 * block for
# a noised copy's position and 2 * block + 1 for a clean copy's. A query q may see key k iff both lie in
# the same non-zero segment and (k == q or (k is clean and k < q)): a noised block sees itself and the
# clean blocks before it, a clean block sees the clean blocks up to itself, nothing sees a noised
# block of another block. model/diffusion.py builds the ids; every backend applies this one rule.
BD_CODE_BITS = 16
BD_MAX_SEGMENTS = (1 << (31 - BD_CODE_BITS)) - 1
BD_MAX_BLOCKS = 1 << (BD_CODE_BITS - 1)

_BINDING_EXPORTS = ("masked_attention", "masked_cross_entropy", "resolve_backend", "ENV_BACKEND",
                    "spmd_mesh")

__all__ = ["BACKENDS", "OPS", "BackendImpl", "register_backend", "get_backend",
           "available_backends", *_BINDING_EXPORTS]


def __getattr__(name):
    if name in _BINDING_EXPORTS:
        binding = importlib.import_module("kernels.binding")
        value = getattr(binding, name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
