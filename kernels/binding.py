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

Custom ops: `_JaxOp` does not call call_jax itself but four torch custom ops
(`pallas_dlm::{attention,cross_entropy}_{fwd,bwd}`, with fake implementations giving the output
shapes). AOTAutograd can trace through them, which torch_xla's scan over layers needs
(model.remat.scan_layers); their real implementation is the call_jax above. A call's static
arguments (backend, causal, sm_scale, block sizes, sharding) travel as one string key into
`_CALLS`, since custom-op schemas take only plain scalars.

SPMD (DESIGN.md section 3, "Kernels under SPMD"): when torch_xla runs in SPMD mode with a global
mesh of more than one device, each kernel call runs inside a manual-sharding region
(`enable_manual_sharding` / `disable_manual_sharding`, as torch_xla's own Pallas flash attention
does): every device runs the kernel on its shard of the batch (mesh axes `BATCH_AXES`) and, for
attention, of the heads (`HEAD_AXIS`), so no full activation, score matrix or logits tensor is
ever gathered. The cross-entropy's weight is replicated inside the region (FSDP gathers weights
anyway); its loss and weight gradient are per-shard partial sums, returned with a leading shard
axis and summed outside the region, which GSPMD lowers to an all-reduce / reduce-scatter. An axis
whose size does not divide the dimension is left unsharded (computed redundantly, still correct).
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
    'pallas' becomes 'mosaic' on TPU (and while compiling for one, kernels.tpu.compile_for) and
    'interpret' elsewhere."""
    name = backend if backend is not None else os.environ.get(ENV_BACKEND) or DEFAULT_BACKEND
    name = str(name).strip().lower()
    if name not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_BACKEND}"
        raise ValueError(f"kernels: {source}={name!r} is unknown; allowed: {', '.join(BACKENDS)}")
    if name == "pallas":
        name = "mosaic" if lowering_platform() == "tpu" else "interpret"
    return name


def lowering_platform() -> str:
    """The platform call_jax lowers the JAX functions for: "tpu" on a TPU and while compiling ahead
    of time for one (kernels.tpu.compile_for), else "cpu" (JAX's default backend there: the trainer
    and tests run JAX on the CPU). Chosen here, not by JAX's default backend: inside torch_xla on
    a TPU that backend is not the runtime that compiles the graph."""
    from kernels import tpu as ktpu

    return "tpu" if _on_tpu() or ktpu.compile_target() is not None else "cpu"


_CALLABLES: dict = {}


def _call_jax(fn, args, kwargs):
    """torch_xla's call_jax, lowering for lowering_platform() (torch_xla's own lowers for JAX's
    default backend). Same cache semantics: keyed on the function's identity, then on shapes and
    static values."""
    # Imported here: torch_xla must be imported (and its device created) by the caller's process
    # before CPU autograd runs, which the trainer and tests arrange; importing it lazily keeps
    # `import kernels` cheap for the naive path.
    from jax._src import config
    from torch_xla._internal.jax_workarounds import maybe_get_jax, maybe_get_torchax

    # As torch_xla's call_jax, before the key (the JAX config is part of it): these set JAX up for torch_xla
    # (GSPMD-style shardings, not Shardy's, in the lowered HLO).
    maybe_get_jax()
    maybe_get_torchax()
    platform = lowering_platform()
    key = (id(fn), platform, config.trace_context())
    if key not in _CALLABLES:
        _CALLABLES[key] = _platform_callable(fn, platform)
    return _CALLABLES[key](*args, **kwargs)


def traced_count() -> int:
    """How many (function, shapes, statics) specialisations _call_jax has traced so far."""
    return sum(len(c._cache) for c in _CALLABLES.values())


def _platform_callable(fn, platform: str):
    from torch_xla.core import xla_builder as xb

    class JaxOnPlatform(xb.JaxCallable):
        def specialize(self, sample_flat_args):
            import jax
            from torchax.ops.mappings import t2j_dtype

            shapes = tuple(jax.ShapeDtypeStruct(a.shape, t2j_dtype(a.dtype)) for a in sample_flat_args)
            jitted = jax.jit(self._flat_input_func.flat_call, keep_unused=True)
            # For the CPU, JAX's own (default-backend) lowering, as torch_xla's: it keeps CPU-specific
            # rules that an explicit cross-platform lowering drops (a bf16 x bf16 -> fp32 dot that
            # XLA:CPU cannot run, "DotThunk: BF16 x BF16 = F32").
            lowered = (jitted.lower(shapes) if platform == "cpu"
                       else jitted.trace(shapes).lower(lowering_platforms=(platform,)))
            proto = lowered.compiler_ir("hlo").as_serialized_hlo_module_proto()
            return xb.xla_computation_as_func(
                xb.computation_from_module_proto("jax_callable", proto), "jax_func")

    return JaxOnPlatform(fn)


# Per-op residual convention, matching kernels.reference:
#   attention:     fwd -> (o, lse);        bwd(q, k, v, segment_ids, o, lse, do)
#   cross_entropy: fwd -> (loss_sum, lse); bwd(hidden, weight, targets, token_weight, lse, g)
_SAVES_OUTPUT = {"attention": True, "cross_entropy": False}

# Mesh axes the kernels shard over under SPMD (train/sharding.py builds meshes with these names).
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"

# ---- static arguments of a call, by key ---------------------------------------------------------

# key -> (impl, static kwargs, sharding plan or None). A handful of entries per run (one per op,
# backend, block sizes and shape class), so it is never pruned.
_CALLS: dict[str, tuple] = {}


def _call_key(impl, static: dict, plan) -> str:
    key = repr((impl.op, impl.name, sorted(static.items()), plan))
    _CALLS.setdefault(key, (impl, static, plan))
    return key


def _run(key: str, which: str, tensors):
    impl, static, plan = _CALLS[key]
    fn = impl.fwd if which == "fwd" else impl.bwd
    if plan is None:
        outs = _call_jax(fn, tensors, static)
    else:
        in_specs, out_specs = plan[which]
        outs = _call_jax_sharded(fn, tensors, static, in_specs, out_specs)
    return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)


# ---- the custom ops -----------------------------------------------------------------------------

from torch import Tensor  # noqa: E402


@torch.library.custom_op("pallas_dlm::attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor,
                      key: str) -> tuple[Tensor, Tensor]:
    o, lse = _run(key, "fwd", (q, k, v, segment_ids))
    return o, lse


@_attention_fwd_op.register_fake
def _(q, k, v, segment_ids, key):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("pallas_dlm::attention_bwd", mutates_args=())
def _attention_bwd_op(q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor, o: Tensor,
                      lse: Tensor, do: Tensor, key: str) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _run(key, "bwd", (q, k, v, segment_ids, o, lse, do))
    return dq, dk, dv


@_attention_bwd_op.register_fake
def _(q, k, v, segment_ids, o, lse, do, key):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("pallas_dlm::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(hidden: Tensor, weight: Tensor, targets: Tensor, token_weight: Tensor,
                          key: str) -> tuple[Tensor, Tensor]:
    loss_sum, lse = _run(key, "fwd", (hidden, weight, targets, token_weight))
    return loss_sum, lse


@_cross_entropy_fwd_op.register_fake
def _(hidden, weight, targets, token_weight, key):
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty(hidden.shape[:1], dtype=torch.float32))


@torch.library.custom_op("pallas_dlm::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(hidden: Tensor, weight: Tensor, targets: Tensor, token_weight: Tensor,
                          lse: Tensor, g: Tensor, key: str) -> tuple[Tensor, Tensor]:
    d_hidden, d_weight = _run(key, "bwd", (hidden, weight, targets, token_weight, lse, g))
    return d_hidden, d_weight


@_cross_entropy_bwd_op.register_fake
def _(hidden, weight, targets, token_weight, lse, g, key):
    return torch.empty_like(hidden), torch.empty_like(weight)


_OPS = {("attention", "fwd"): _attention_fwd_op, ("attention", "bwd"): _attention_bwd_op,
        ("cross_entropy", "fwd"): _cross_entropy_fwd_op,
        ("cross_entropy", "bwd"): _cross_entropy_bwd_op}


class _JaxOp(torch.autograd.Function):
    """Runs impl.fwd / impl.bwd (through the custom ops). Arguments: (key, *tensors)."""

    @staticmethod
    def forward(ctx, key, *tensors):
        impl = _CALLS[key][0]
        outs = _OPS[impl.op, "fwd"](*tensors, key)
        out = outs[0]
        # Attention's backward needs its own output (rowsum(dO * O)), so o is saved with lse.
        residuals = tuple(outs) if _SAVES_OUTPUT[impl.op] else tuple(outs[1:])
        ctx.key, ctx.op, ctx.num_tensors = key, impl.op, len(tensors)
        ctx.save_for_backward(*tensors, *residuals)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grads = _OPS[ctx.op, "bwd"](*saved, grad_out.contiguous(), ctx.key)
        grads = tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
        # Tensors past the differentiable ones (segment_ids, targets, token_weight) get None.
        padded = grads + (None,) * (ctx.num_tensors - len(grads))
        padded = tuple(g if need else None for g, need in zip(padded, ctx.needs_input_grad[1:]))
        return (None, *padded)


# ---- SPMD ---------------------------------------------------------------------------------------


def spmd_mesh():
    """torch_xla's global mesh when SPMD is on and the mesh has more than one device, else None."""
    import sys

    if "torch_xla" not in sys.modules:  # nothing imported torch_xla: certainly not SPMD
        return None
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        return None
    mesh = xs.get_global_mesh()
    return mesh if mesh is not None and int(mesh.size()) > 1 else None


def _mesh_axes(mesh, names, size: int):
    """The axes among `names` that exist in the mesh with more than one device, as one spec entry,
    when their product divides `size`; else None (that dimension stays whole on every device)."""
    shape = mesh.shape()
    axes = tuple(a for a in names if shape.get(a, 1) > 1)
    prod = math.prod(shape[a] for a in axes)
    if not axes or size % prod:
        return None
    return axes if len(axes) > 1 else axes[0]


def _attention_plan(mesh, q, k):
    b = _mesh_axes(mesh, BATCH_AXES, q.shape[0])
    h = _mesh_axes(mesh, (HEAD_AXIS,), math.gcd(q.shape[1], k.shape[1]))
    if b is None and h is None:
        return None
    x, seg, lse = (b, h, None, None), (b, None), (b, h, None)
    return {"fwd": ((x, x, x, seg), (x, lse)),
            "bwd": ((x, x, x, seg, x, lse, x), (x, x, x))}


# An output spec ("partial", axes) marks a per-shard partial sum over the batch shards.
def _cross_entropy_plan(mesh, hidden):
    b = _mesh_axes(mesh, BATCH_AXES, hidden.shape[0])
    if b is None:
        return None
    rows, vec, whole = (b, None), (b,), (None, None)
    return {"fwd": ((rows, whole, vec, vec), (("partial", b), vec)),
            "bwd": ((rows, whole, vec, vec, vec, ()), (rows, ("partial", b)))}


def _call_jax_sharded(fn, tensors, static, in_specs, out_specs):
    """call_jax inside a manual-sharding region: each device runs `fn` on its shard."""
    import torch_xla
    import torch_xla.distributed.spmd as xs

    mesh = xs.get_global_mesh()
    shape = mesh.shape()
    local = []
    for t, spec in zip(tensors, in_specs):
        scalar = t.ndim == 0
        if scalar:
            t, spec = t.reshape(1), (None,)
        if t.is_leaf or torch_xla._XLAC._get_xla_sharding_spec(t):
            # mark_sharding refuses to change the annotation of a tensor that already has one (an
            # input sharded on the batch only, say), and crashes on a parameter without data (the
            # placeholders of train/aot.py); a view is a fresh IR value it can annotate.
            t = t.view(t.shape)
        t = xs.enable_manual_sharding(t, spec, mesh=mesh).global_tensor
        local.append(t.reshape(()) if scalar else t)
    outs = _call_jax(fn, local, static)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    result = []
    for o, spec in zip(outs, out_specs):
        partial = isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "partial"
        if partial:  # this shard's partial sum, stacked along a new leading shard axis
            o = o.unsqueeze(0)
            spec = (spec[1],) + (None,) * (o.ndim - 1)
        full = tuple(n * math.prod(shape[a] for a in ((s,) if isinstance(s, str) else s or ()))
                     for n, s in zip(o.shape, spec))
        o = xs.disable_manual_sharding(o, spec, full, mesh=mesh).global_tensor
        result.append(o.sum(0) if partial else o)
    return tuple(result)


def _static_kwargs(impl, block_sizes, **base):
    kwargs = dict(impl.static)
    kwargs.update(base)
    if impl.takes_block_sizes and block_sizes is not None:
        kwargs["block_sizes"] = _hashable(block_sizes)
    if impl.name == "mosaic":  # the Mosaic kernels size their tiles and VMEM for the chip
        kwargs["chip"] = target_chip()
    return kwargs


def target_chip() -> str | None:
    """Name of the TPU generation the Mosaic kernels are built for: the ahead-of-time target
    (kernels.tpu.compile_for), else this process's TPU (its PJRT device kind), else None (sized
    for every generation)."""
    from kernels import tpu as ktpu

    chip = ktpu.compile_target()
    if chip is None and _on_tpu():
        import torch_xla.core.xla_model as xm

        chip = ktpu.detect_chip(xm.xla_device_kind())
    return chip.name if chip is not None else None


def _compute_dtype(device_type: str, *tensors) -> torch.dtype:
    """The dtype a kernel's floating operands are brought to: autocast's when it is on for the
    device (bf16 MXU operands with fp32 accumulation, as autocast gives a matmul), else the widest
    of theirs (under autocast q and k leave the fp32-weighted RMSNorm as fp32 while v is bf16)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


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
                     backend: str | None = None, block_sizes=None, block_diffusion: bool = False):
    """Segment-masked (optionally causal, or block-diffusion) attention with GQA.

    q [B,Hq,L,D], k/v [B,Hkv,L,D], segment_ids [B,L] (0 = padding) -> o [B,Hq,L,D].
    A query attends only to keys of its own non-zero segment; padding queries give o = 0.
    block_diffusion: segment_ids are block-diffusion ids and the rule of kernels/__init__.py applies.
    """
    if causal and block_diffusion:
        raise ValueError("masked_attention: causal and block_diffusion exclude each other")
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
    dtype = _compute_dtype(q.device.type, q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    name = resolve_backend(backend)
    if name == "naive":
        return attention_naive(q, k, v, segment_ids, causal=causal, sm_scale=sm_scale,
                               block_diffusion=block_diffusion)
    impl = get_backend("attention", name)
    _require_xla(name, "attention", q, k, v, segment_ids)
    # block_diffusion travels only when set, so the plain calls keep their cached graphs.
    extra = {"block_diffusion": True} if block_diffusion else {}
    static = _static_kwargs(impl, block_sizes, causal=bool(causal), sm_scale=sm_scale, **extra)
    mesh = spmd_mesh()
    plan = _attention_plan(mesh, q, k) if mesh is not None else None
    return _JaxOp.apply(_call_key(impl, static, plan), q, k, v, segment_ids)


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
    # Under autocast the LM head's operands are bf16, as autocast makes any matmul's; the kernels
    # accumulate logits, the log-sum-exp and both gradients in fp32 and return an fp32 loss.
    dtype = _compute_dtype(hidden.device.type, hidden, weight)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    name = resolve_backend(backend)
    if name == "naive":
        return cross_entropy_naive(hidden, weight, targets, token_weight)
    impl = get_backend("cross_entropy", name)
    _require_xla(name, "cross_entropy", hidden, weight, targets, token_weight)
    static = _static_kwargs(impl, block_sizes)
    mesh = spmd_mesh()
    plan = _cross_entropy_plan(mesh, hidden) if mesh is not None else None
    return _JaxOp.apply(_call_key(impl, static, plan), hidden, weight, targets, token_weight)
