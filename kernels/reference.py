"""Pure-jnp reference implementations of the two fused ops (no torch, no Pallas).

They define the semantics every other backend is tested against, and they are themselves a backend
("reference") behind the torch binding. Each op comes as a module-level forward/backward pair with
the kernel contract's convention:

    fwd(*tensors, **static) -> (out, *residuals)
    bwd(*tensors, *residuals, grad_out, **static) -> grads of the differentiable tensors

The backward passes are written by hand from the saved log-sum-exp (no jax.vjp of the forward), so
they have the same structure as the Pallas kernels and the binding never re-runs a forward.

Masking semantics (shared by all backends):
- attention: a query attends only to keys with the same non-zero segment id (and key index <= query
  index when causal; with block_diffusion, by the block-diffusion rule of kernels/__init__.py). Queries in segment 0 (padding) produce o = 0, lse = 0 and zero gradients.
- cross-entropy: loss_sum = sum over token_weight > 0 of token_weight * (lse - target logit), fp32.
  Rows with weight <= 0 contribute exactly 0 to the loss and to both gradients, whatever they hold.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# fp32 inputs must stay fp32 on TPU too (the default there is bf16 passes); bf16 inputs are
# unaffected and still accumulate in fp32 through preferred_element_type.
_PRECISION = jax.lax.Precision.HIGHEST
_F32 = jnp.float32


def default_sm_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------


def _check_attention_shapes(q, k, v, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention: q, k, v must be [B, H, L, D]; got {q.shape}, {k.shape}, {v.shape}")
    b, hq, l, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (l, d):
        raise ValueError(f"attention: k {k.shape} / v {v.shape} do not fit q {q.shape}")
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"attention: query heads {hq} not a multiple of key/value heads {hkv}")
    if segment_ids.shape != (b, l):
        raise ValueError(f"attention: segment_ids {segment_ids.shape} must be [B, L] = {(b, l)}")
    return b, hq, hkv, l, d


def block_diffusion_allowed(q_ids, k_ids):
    """The block-diffusion rule on broadcastable id arrays (kernels/__init__.py): same non-zero
    segment, and the same block copy or a clean key of an earlier code."""
    from kernels import BD_CODE_BITS

    same_segment = jnp.right_shift(q_ids, BD_CODE_BITS) == jnp.right_shift(k_ids, BD_CODE_BITS)
    clean_before = (jnp.bitwise_and(k_ids, 1) == 1) & (k_ids < q_ids)
    return same_segment & (q_ids != 0) & ((k_ids == q_ids) | clean_before)


def _attention_mask(segment_ids, causal: bool, block_diffusion: bool = False):
    """[B, 1, 1, Lq, Lk] bool: which keys each query may see."""
    seg = segment_ids.astype(jnp.int32)
    if block_diffusion:
        return block_diffusion_allowed(seg[:, :, None], seg[:, None, :])[:, None, None, :, :]
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    if causal:
        l = seg.shape[1]
        idx = jnp.arange(l, dtype=jnp.int32)
        mask = mask & (idx[None, :, None] >= idx[None, None, :])
    return mask[:, None, None, :, :]


def _grouped(x, hkv):
    """[B, Hq, L, D] -> [B, Hkv, G, L, D]: query head h uses kv head h // G (HF's repeat_kv order)."""
    b, hq, l, d = x.shape
    return x.reshape(b, hkv, hq // hkv, l, d)


def _scores(q, k, hkv, sm_scale):
    # Operands widened to fp32 (exact for bf16, and the same fp32 accumulation): XLA:CPU cannot run
    # a batched bf16 x bf16 -> fp32 dot ("DotThunk: BF16 x BF16 = F32") on CPUs with avx512_bf16.
    qg = _grouped(q, hkv).astype(_F32)
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k.astype(_F32), precision=_PRECISION)
    return s * jnp.asarray(sm_scale, _F32)


def attention_reference_fwd(q, k, v, segment_ids, *, causal: bool, sm_scale: float | None,
                            block_diffusion: bool = False):
    """Returns (o [B,Hq,L,D] in q's dtype, lse [B,Hq,L] fp32; 0 on rows that see no key)."""
    b, hq, hkv, l, d = _check_attention_shapes(q, k, v, segment_ids)
    if sm_scale is None:
        sm_scale = default_sm_scale(d)
    s = _scores(q, k, hkv, sm_scale)
    mask = _attention_mask(segment_ids, causal, block_diffusion)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    live = jnp.isfinite(m)  # False exactly on rows that see no key (padding queries)
    m = jnp.where(live, m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    denom = jnp.sum(p, axis=-1)
    lse = jnp.where(live, m + jnp.log(jnp.where(live, denom, 1.0)), 0.0)
    p = p / jnp.where(live, denom, 1.0)[..., None]
    o = jnp.einsum("bhgqk,bhkd->bhgqd", p, v.astype(_F32), precision=_PRECISION)
    return o.reshape(b, hq, l, d).astype(q.dtype), lse.reshape(b, hq, l)


def attention_reference_bwd(q, k, v, segment_ids, o, lse, do, *, causal: bool,
                            sm_scale: float | None, block_diffusion: bool = False):
    """Dense backward from the saved lse: P = exp(S - lse), dS = P * (dP - rowsum(dO * O))."""
    b, hq, hkv, l, d = _check_attention_shapes(q, k, v, segment_ids)
    if sm_scale is None:
        sm_scale = default_sm_scale(d)
    mask = _attention_mask(segment_ids, causal, block_diffusion)
    s = _scores(q, k, hkv, sm_scale)
    lse_g = lse.astype(_F32).reshape(b, hkv, hq // hkv, l)
    # Masked (and padding-row) entries get P = 0 exactly, so they feed no gradient anywhere.
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s - lse_g[..., None], 0.0)), 0.0)
    do_g = _grouped(do, hkv).astype(_F32)
    o_g = _grouped(o, hkv).astype(_F32)
    delta = jnp.sum(do_g * o_g, axis=-1)  # [B, Hkv, G, L]
    dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_g, v.astype(_F32), precision=_PRECISION)
    ds = p * (dp - delta[..., None]) * jnp.asarray(sm_scale, _F32)
    dq = jnp.einsum("bhgqk,bhkd->bhgqd", ds, k.astype(_F32), precision=_PRECISION)
    # Sum over the query heads sharing a kv head (GQA) happens inside the contraction.
    dk = jnp.einsum("bhgqk,bhgqd->bhkd", ds, _grouped(q, hkv).astype(_F32), precision=_PRECISION)
    dv = jnp.einsum("bhgqk,bhgqd->bhkd", p, do_g, precision=_PRECISION)
    return dq.reshape(b, hq, l, d).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def attention_reference(q, k, v, segment_ids, *, causal: bool = False,
                        sm_scale: float | None = None, block_diffusion: bool = False):
    return attention_reference_fwd(q, k, v, segment_ids, causal=causal, sm_scale=sm_scale,
                                   block_diffusion=block_diffusion)[0]


# --------------------------------------------------------------------------------------------------
# cross-entropy over the LM head
# --------------------------------------------------------------------------------------------------


def _check_ce_shapes(hidden, weight, targets, token_weight):
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"cross_entropy: hidden must be [N, H] and weight [V, H]; got {hidden.shape}, "
            f"{weight.shape}")
    n = hidden.shape[0]
    if targets.shape != (n,) or token_weight.shape != (n,):
        raise ValueError(
            f"cross_entropy: targets {targets.shape} and token_weight {token_weight.shape} must be "
            f"[N] = ({n},)")


def _active_rows(hidden, token_weight):
    """(active [N] bool, hidden with inactive rows zeroed so garbage there cannot leak as NaN)."""
    active = token_weight > 0
    return active, jnp.where(active[:, None], hidden, jnp.zeros((), hidden.dtype))


def _logits(hidden, weight):
    return jnp.einsum("nh,vh->nv", hidden.astype(_F32), weight.astype(_F32), precision=_PRECISION)


def cross_entropy_reference_fwd(hidden, weight, targets, token_weight):
    """Returns (loss_sum fp32 scalar, lse [N] fp32)."""
    _check_ce_shapes(hidden, weight, targets, token_weight)
    active, h = _active_rows(hidden, token_weight)
    logits = _logits(h, weight)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets.astype(jnp.int32)[:, None], axis=-1)[:, 0]
    per_token = jnp.where(active, token_weight.astype(_F32) * (lse - tgt), 0.0)
    return jnp.sum(per_token), lse


def cross_entropy_reference_bwd(hidden, weight, targets, token_weight, lse, g):
    """d/dlogits = w * g * (softmax - onehot(target)) on active rows, 0 elsewhere."""
    _check_ce_shapes(hidden, weight, targets, token_weight)
    active, h = _active_rows(hidden, token_weight)
    logits = _logits(h, weight)
    coef = jnp.where(active, token_weight.astype(_F32) * jnp.asarray(g, _F32), 0.0)
    probs = jnp.exp(logits - lse.astype(_F32)[:, None])
    onehot = jax.nn.one_hot(targets.astype(jnp.int32), weight.shape[0], dtype=_F32)
    dlogits = jnp.where(active[:, None], (probs - onehot) * coef[:, None], 0.0)
    d_hidden = jnp.einsum("nv,vh->nh", dlogits, weight.astype(_F32), precision=_PRECISION)
    d_weight = jnp.einsum("nv,nh->vh", dlogits, h.astype(_F32), precision=_PRECISION)
    return d_hidden.astype(hidden.dtype), d_weight.astype(weight.dtype)


def cross_entropy_reference(hidden, weight, targets, token_weight):
    return cross_entropy_reference_fwd(hidden, weight, targets, token_weight)[0]
