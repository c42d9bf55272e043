"""Pallas fused masked attention (flash-attention forward, hand-written backward), pure JAX.

Semantics are those of `kernels.reference.attention_reference_fwd/bwd`: a query attends only to
keys with its own non-zero segment id (and, when causal, to keys at or before it); padding queries
(segment 0) give o = 0, lse = 0 and zero gradients. GQA: query head h reads kv head
h // (Hq // Hkv).

Three kernels, each a `pallas_call` over a grid of (query block, key block) pairs:
  forward  grid (B, Hq, nq, nk)        online softmax over key blocks; saves lse (fp32)
  dq       grid (B, Hq, nq, nk)        recomputes P from lse, accumulates dq over key blocks
  dk/dv    grid (B, Hkv, nk, G, nq)    accumulates dk, dv over the G query heads of a kv head and
                                       over query blocks, so K/V are never repeated in HBM

Work skipping. The wrapper reduces the segment ids to per-block ranges (min/max non-zero id) and,
from them, to the interval of partner blocks each block must visit; these small int32 tables are
scalar-prefetched into SMEM. A grid step whose pair cannot interact (ranges disjoint, a block that
is all padding, or entirely above the diagonal when causal) runs nothing (`pl.when`), and its
index_map clamps the partner block into the visited interval, so the block index repeats and the
TPU pipeline issues no DMA for it. With packed rows (ids ascending, padding at the end) the visited
interval is exactly the set of interacting blocks; for arbitrary id orders the in-kernel range test
still skips the compute, only the copy may happen.

Layout choices follow what Mosaic lowers well: segment ids are passed twice, as columns
[B, L, 128] (ids broadcast over lanes) and as rows [B, 8, L] (broadcast over sublanes); softmax
statistics live as [block, 128] lane-replicated scratch; per-row vectors (lse, D = rowsum(dO*O))
travel as [.., 1, L] rows. The dk/dv kernel works on transposed scores [bk, bq] so that lse and D
broadcast along sublanes without a relayout.

On CPU (interpret=True) the kernels take whole arrays and slice their blocks themselves: the
generic interpreter copies every blocked input in full on every grid step, which made per-step
overhead, not the skipped work, decide the run time. The TPU path (interpret=False, also what
`force_tpu_interpret_mode` emulates) uses the blocked layout above.

Everything is masked with `jnp.where`, never by multiplying: in interpret mode uninitialised memory
is NaN (DESIGN.md section 6), and the wrapper pads L up to a whole number of blocks (padding is
segment 0, zero-filled) so no block ever reads past the arrays.

Segment ids must be >= 0 (0 = padding), as the batch contract has them; the schedule treats
anything <= 0 as padding.

On TPU the blocks are chosen per chip (kernels/tpu.py has each generation's VMEM): with none given,
each kernel takes the largest pair of _LADDER whose VMEM estimate (`vmem_estimate`: pipelined blocks,
scratch, score temporaries) fits; given blocks that cannot fit are refused in one line. The kernels
declare a scoped VMEM limit from the estimate and carry `pl.CostEstimate`s for XLA's cost model.

Public: `BlockSizes`, `DEFAULT_BLOCK_SIZES`, `attention_fwd`, `attention_bwd` (the backend pair),
`block_schedule`, `count_computed_blocks`, `attention_matmul_flops`, `vmem_estimate`, and the debug
helper `attention_fwd_block_visits`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import BD_CODE_BITS
from kernels import tpu as ktpu

# Mosaic kernels are serialised for the libtpu the project pins, whatever JAX's default backend is.
ktpu.pin_mosaic_ir_version()

__all__ = [
    "BlockSizes",
    "DEFAULT_BLOCK_SIZES",
    "attention_fwd",
    "attention_bwd",
    "block_schedule",
    "count_computed_blocks",
    "attention_matmul_flops",
    "attention_fwd_block_visits",
]

NUM_LANES = 128
NUM_SUBLANES = 8
# Finite "minus infinity" for masked scores: exp(MASK_VALUE - m) underflows to 0 without producing
# inf - inf = NaN when a whole row of a block is masked.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


# --------------------------------------------------------------------------------------------------
# block sizes
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels (query rows x key rows per grid step).

    `block_q`/`block_k` are the forward's; the backward kernels default to them. Sizes are clamped
    to the (128-rounded) sequence length, so the defaults serve short sequences too. On TPU every
    size must be a multiple of 128 (lane width); in interpret mode any positive size works.
    Frozen and hashable: it is a static argument of the jitted kernels.
    """

    block_q: int = 512
    block_k: int = 512
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if val is None and f.name not in ("block_q", "block_k"):
                continue
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
                raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {val!r}")
            object.__setattr__(self, f.name, int(val))

    @property
    def fwd(self) -> tuple[int, int]:
        return self.block_q, self.block_k

    @property
    def dq(self) -> tuple[int, int]:
        return self.block_q_dq or self.block_q, self.block_k_dq or self.block_k

    @property
    def dkv(self) -> tuple[int, int]:
        return self.block_q_dkv or self.block_q, self.block_k_dkv or self.block_k

    @classmethod
    def from_config(cls, cfg) -> BlockSizes:
        """None (defaults) | BlockSizes | (block_q, block_k) | 6-tuple in field order | mapping
        with field names (e.g. the model's `attention_kernel_config`; unknown keys are an error)."""
        if cfg is None:
            return DEFAULT_BLOCK_SIZES
        if isinstance(cfg, BlockSizes):
            return cfg
        if isinstance(cfg, (tuple, list)):
            if len(cfg) not in (2, 6):
                raise ValueError(
                    f"block_sizes tuple must be (block_q, block_k) or all 6 fields, got {cfg!r}")
            return cls(*cfg)
        if isinstance(cfg, Mapping) or hasattr(cfg, "items"):
            items = dict(cfg.items())
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(items) - names)
            if unknown:
                raise ValueError(f"attention block sizes: unknown keys {unknown}; known: "
                                 f"{sorted(names)}")
            return cls(**{key: val for key, val in items.items() if val is not None}) \
                if items else DEFAULT_BLOCK_SIZES
        raise TypeError(f"cannot read attention block sizes from {type(cfg).__name__}: {cfg!r}")


# 512x512 tiles: on TPU a 128x128 step is dominated by the ~0.35 us per-step overhead; 512 rows keep
# the MXU busy while still skipping at a granularity finer than typical packed SFT examples.
DEFAULT_BLOCK_SIZES = BlockSizes()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _fit_block(block: int, seq_len: int) -> int:
    """Clamp a block size to the sequence, keeping it aligned (128 when the block is >= 128)."""
    return min(block, _round_up(seq_len, min(block, NUM_LANES)))


class _Plan(NamedTuple):
    padded_len: int
    fwd: tuple[int, int]
    dq: tuple[int, int]
    dkv: tuple[int, int]
    vmem_limit: int | None = None  # scoped VMEM the Mosaic kernels declare (None: interpret mode)


# On TPU, with no block sizes given, each kernel takes the first (block_q, block_k) of this ladder
# whose VMEM estimate fits the chip (512 x 512 wherever it does).
_LADDER = ((512, 512), (512, 256), (256, 256), (256, 128), (128, 128))
_KERNELS = {"fwd": "forward", "dq": "dq backward", "dkv": "dk/dv backward"}
_CONFIG_KEYS = {"fwd": ("block_q", "block_k"), "dq": ("block_q_dq", "block_k_dq"),
                "dkv": ("block_q_dkv", "block_k_dkv")}


# Temporaries of each kernel's score arithmetic, as multiples of one [bq, bk] fp32 block (S) and of
# one [block, head_dim] fp32 block (Q), by operand width: fitted as upper bounds of what Mosaic
# allocates on top of the pipelined blocks and scratch (least VMEM limit that compiles, measured by
# bisection with libtpu 0.0.21 at blocks 512 and 1024, head_dim 32-256, on v5e; fp32 runs
# HIGHEST-precision matmuls, whose bf16 splits of the operands need more room). Other generations
# need up to 9% more (v5p), hence _TEMPS_MARGIN; v4, without bf16 elementwise units, allocates
# bf16 kernels' temporaries like fp32 ones.
_TEMPS = {("fwd", 2): (1.8, 2.0), ("fwd", 4): (2.3, 4.0), ("dq", 2): (1.0, 2.0),
          ("dq", 4): (3.2, 5.0), ("dkv", 2): (1.0, 6.5), ("dkv", 4): (3.4, 9.5)}
_TEMPS_MARGIN = 1.15


def vmem_estimate(which: str, bq: int, bk: int, head_dim: int, dtype, chip=None) -> int:
    """Bytes of VMEM one grid step of kernel `which` (fwd, dq, dkv) holds on `chip` (kernels.tpu;
    None: any): its pipelined blocks (two buffers each), its scratch, and the temporaries of the
    score arithmetic (_TEMPS). An upper bound of Mosaic's own allocation, checked by
    tests/test_tpu_compile.py."""
    sz = jnp.dtype(dtype).itemsize
    dp = _round_up(head_dim, NUM_LANES)  # a [rows, 32] block still occupies 128 lanes
    seg_q, seg_k = bq * NUM_LANES * 4, NUM_SUBLANES * bk * 4  # column- / row-form segment ids
    row = NUM_SUBLANES * bq * 4  # a [1, bq] fp32 row (lse, D) takes 8 sublanes
    if which == "fwd":
        blocks = (2 * bq + 2 * bk) * dp * sz + seg_q + seg_k + row  # q, k, v, o, ids, lse
        scratch = 2 * bq * NUM_LANES * 4 + bq * dp * 4  # m, l, acc
    elif which == "dq":
        blocks = (3 * bq + 2 * bk) * dp * sz + seg_q + seg_k + 2 * row  # q, do, k, v, dq, ids, lse, D
        scratch = bq * dp * 4
    else:
        blocks = (2 * bq + 4 * bk) * dp * sz + NUM_SUBLANES * bq * 4 + bk * NUM_LANES * 4 + 2 * row
        scratch = 2 * bk * dp * 4  # dk, dv accumulators
    width = 4 if sz >= 4 or not ktpu.get_chip(chip).bf16_vpu else 2
    per_s, per_q = _TEMPS[which, width]
    temps = _TEMPS_MARGIN * (per_s * bq * bk * 4 + per_q * max(bq, bk) * dp * 4)
    return int(2 * blocks + scratch + temps)


def _plan(block_sizes, seq_len: int, interpret: bool, *, chip=None, head_dim: int | None = None,
          dtype=None) -> _Plan:
    """Blocks of the three kernels for a sequence of seq_len. On TPU (interpret False) the blocks
    must be multiples of 128 and fit the chip's VMEM (kernels.tpu): with none given each kernel
    takes the largest rung of _LADDER that fits; given ones that cannot fit are refused in one line."""
    tpu = not interpret and head_dim is not None
    chip = ktpu.resolve_chip(chip) if tpu else None
    if block_sizes is None and tpu:
        pairs = [tuple(_fit_block(b, seq_len) for b in _first_fit(which, seq_len, head_dim, dtype, chip))
                 for which in _KERNELS]
    else:
        bs = BlockSizes.from_config(block_sizes)
        pairs = [tuple(_fit_block(b, seq_len) for b in pair) for pair in (bs.fwd, bs.dq, bs.dkv)]
    padded = _round_up(seq_len, math.lcm(*(b for pair in pairs for b in pair)))
    if not interpret:
        # Mosaic tiles are (8, 128); blocks are lane dims of the segment-id and lse rows (and
        # the forward transposes [bq, 128] statistics, which wants whole 128 x 128 tiles).
        bad = sorted({b for pair in pairs for b in pair if b % NUM_LANES})
        if bad:
            raise ValueError(f"attention block sizes {bad} must be multiples of {NUM_LANES} for "
                             f"the TPU (Mosaic) kernels (sequence length {seq_len}, padded "
                             f"{padded})")
    needs = []
    if tpu:
        for which, (bq, bk) in zip(_KERNELS, pairs):
            need = vmem_estimate(which, bq, bk, head_dim, dtype, chip)
            needs.append(need)
            if need > chip.kernel_vmem_budget:
                keys = ", ".join(f"{k}={b}" for k, b in zip(_CONFIG_KEYS[which], (bq, bk)))
                raise ktpu.vmem_error(
                    f"the attention {_KERNELS[which]} with {keys} at head_dim {head_dim} "
                    f"({jnp.dtype(dtype).name})", "model.attention_kernel_config", need, chip,
                    "use smaller blocks, or leave model.attention_kernel_config out to get blocks "
                    "that fit")
    # One limit for the three kernels (the plan is one static argument): the largest one's.
    return _Plan(padded, *pairs, vmem_limit=chip.declared_vmem(max(needs)) if tpu else None)


def _first_fit(which, seq_len, head_dim, dtype, chip) -> tuple[int, int]:
    for bq, bk in _LADDER:
        if vmem_estimate(which, _fit_block(bq, seq_len), _fit_block(bk, seq_len), head_dim,
                         dtype, chip) <= chip.kernel_vmem_budget:
            return bq, bk
    return _LADDER[-1]  # refused by _plan with the figures


# --------------------------------------------------------------------------------------------------
# schedule: which (query block, key block) pairs can interact
# --------------------------------------------------------------------------------------------------


_INT_MAX = int(np.iinfo(np.int32).max)


def _block_ranges(seg, block: int):
    """seg [B, Lp] -> (lo, hi, full, odd_lo) [B, Lp // block] int32: min/max non-zero id (hi == 0:
    all padding); full = 1 when the block holds a single id and no padding (no masking needed);
    odd_lo = the least odd id (a clean position's, with block-diffusion ids), INT_MAX if none."""
    b, lp = seg.shape
    s = seg.reshape(b, lp // block, block)
    real = s > 0
    hi = jnp.max(jnp.where(real, s, 0), axis=-1)
    lo = jnp.min(jnp.where(real, s, _INT_MAX), axis=-1)
    full = (jnp.min(s, axis=-1) == hi) & (hi > 0)
    odd_lo = jnp.min(jnp.where(real & (jnp.bitwise_and(s, 1) == 1), s, _INT_MAX), axis=-1)
    return (jnp.where(hi > 0, lo, 0).astype(jnp.int32), hi.astype(jnp.int32),
            full.astype(jnp.int32), odd_lo.astype(jnp.int32))


def _segment_of(ids):
    return jnp.right_shift(ids, BD_CODE_BITS)


def _pair_active(q_lo, q_hi, k_lo, k_hi, k_odd_lo, i, j, bq: int, bk: int, causal: bool, bd: bool):
    """Whether query block i and key block j can interact. Works on arrays (the wrapper's tables)
    and on scalars read from SMEM inside the kernels, so both sides use the same rule.

    bd (block diffusion): a visible key has the query's own id or is a clean (odd) id below it, so a
    pair can interact only if the segments of the two ranges meet and either the id ranges overlap
    or the key block's least clean id lies below the query block's largest id. With the noised copy
    then the clean copy of a row, this skips the noised keys of other blocks and everything a clean
    query may not see: about a quarter of the pairs run."""
    real = (q_hi > 0) & (k_hi > 0)
    overlap = (q_lo <= k_hi) & (k_lo <= q_hi)
    if bd:
        segments_meet = (_segment_of(q_lo) <= _segment_of(k_hi)) & (_segment_of(k_lo) <= _segment_of(q_hi))
        return real & segments_meet & (overlap | (k_odd_lo < q_hi))
    active = real & overlap
    if causal:
        # Some key of block j is at or before some query of block i.
        active = active & (j * bk <= i * bq + (bq - 1))
    return active


def _active_table(q_lo, q_hi, k_lo, k_hi, k_odd_lo, bq, bk, causal, bd):
    nq, nk = q_lo.shape[1], k_lo.shape[1]
    i = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
    j = jnp.arange(nk, dtype=jnp.int32)[None, None, :]
    return _pair_active(q_lo[:, :, None], q_hi[:, :, None], k_lo[:, None, :], k_hi[:, None, :],
                        k_odd_lo[:, None, :], i, j, bq, bk, causal, bd)  # [B, nq, nk]


def _visit_interval(active):
    """active [B, n, m] -> (first, last) [B, n]: the partner blocks each row of the grid visits.

    Rows with nothing to do point at the last block visited so far (0 before any): for packed
    rows that is the block already in VMEM, so their steps fetch nothing."""
    m = active.shape[-1]
    has = jnp.any(active, axis=-1)
    first = jnp.argmax(active, axis=-1).astype(jnp.int32)
    last = (m - 1 - jnp.argmax(active[..., ::-1], axis=-1)).astype(jnp.int32)
    carry = jnp.maximum(lax.cummax(jnp.where(has, last, -1), axis=1), 0)
    return jnp.where(has, first, carry), jnp.where(has, last, carry)


class _Tables(NamedTuple):
    """Scalar-prefetch operands (flat 1-D int32: SMEM pads 2-D arrays to whole tiles)."""
    q_lo: jax.Array
    q_hi: jax.Array
    q_full: jax.Array
    k_lo: jax.Array
    k_hi: jax.Array
    k_full: jax.Array
    k_odd_lo: jax.Array
    first: jax.Array  # visited interval of the inner grid axis, per (b, outer block)
    last: jax.Array


_NUM_TABLES = len(_Tables._fields)


def _tables(seg_p, bq: int, bk: int, causal: bool, inner: str, bd: bool = False) -> _Tables:
    """inner = "k": grid rows are query blocks (forward, dq); "q": rows are key blocks (dk/dv)."""
    q_lo, q_hi, q_full, _ = _block_ranges(seg_p, bq)
    k_lo, k_hi, k_full, k_odd_lo = _block_ranges(seg_p, bk)
    active = _active_table(q_lo, q_hi, k_lo, k_hi, k_odd_lo, bq, bk, causal, bd)
    if inner == "q":
        active = jnp.swapaxes(active, 1, 2)
    first, last = _visit_interval(active)
    flat = lambda x: x.reshape(-1).astype(jnp.int32)
    return _Tables(*(flat(x) for x in (q_lo, q_hi, q_full, k_lo, k_hi, k_full, k_odd_lo, first, last)))


def _pair_kind(tables, b, i, j, *, nq, nk, bq, bk, causal, bd=False):
    """In-kernel: (run, needs_mask) for grid pair (i, j) from the SMEM tables. A pair inside one
    segment with no padding (and below the diagonal when causal; with block diffusion, two single
    ids the rule lets meet) needs no mask at all."""
    t = _Tables(*tables)
    qi, kj = b * nq + i, b * nk + j
    q_lo, k_lo = t.q_lo[qi], t.k_lo[kj]
    run = _pair_active(q_lo, t.q_hi[qi], k_lo, t.k_hi[kj], t.k_odd_lo[kj], i, j, bq, bk, causal, bd)
    singles = (t.q_full[qi] != 0) & (t.k_full[kj] != 0)
    if bd:
        uniform = singles & (_segment_of(q_lo) == _segment_of(k_lo)) & (
            (q_lo == k_lo) | ((jnp.bitwise_and(k_lo, 1) == 1) & (k_lo < q_lo)))
    else:
        uniform = singles & (q_lo == k_lo)
    if causal:
        uniform = uniform & ((j + 1) * bk - 1 <= i * bq)
    return run, jnp.logical_not(uniform)


def _when_run(run, needs_mask, body):
    """Run body(masked=True/False) under the matching pl.when branch."""
    pl.when(run & needs_mask)(functools.partial(body, True))
    pl.when(run & jnp.logical_not(needs_mask))(functools.partial(body, False))


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k", "block_diffusion"))
def block_schedule(segment_ids, *, causal: bool, block_q: int, block_k: int, block_diffusion: bool = False):
    """bool [B, nq, nk]: the (query block, key block) pairs the kernels compute (after padding L to
    a multiple of both block sizes). Exactly the rule the kernels apply at run time."""
    b, l = segment_ids.shape
    lp = _round_up(l, math.lcm(block_q, block_k))
    seg_p = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, lp - l)))
    q_lo, q_hi, _, _ = _block_ranges(seg_p, block_q)
    k_lo, k_hi, _, k_odd_lo = _block_ranges(seg_p, block_k)
    return _active_table(q_lo, q_hi, k_lo, k_hi, k_odd_lo, block_q, block_k, causal, block_diffusion)


def count_computed_blocks(segment_ids, *, causal: bool, block_q: int, block_k: int,
                          block_diffusion: bool = False):
    """(computed pairs, total pairs) per query head, summed over the batch, as python ints."""
    sched = np.asarray(block_schedule(segment_ids, causal=causal, block_q=block_q,
                                      block_k=block_k, block_diffusion=block_diffusion))
    return int(sched.sum()), int(sched.size)


def attention_matmul_flops(segment_ids, num_q_heads: int, head_dim: int, *, causal: bool,
                           block_sizes=None, backward: bool = True, block_diffusion: bool = False) -> int:
    """Matmul FLOPs the kernels actually run (skipped blocks excluded), per computed block pair:
    forward 2 (QK^T, PV), dq 3 (QK^T, dO V^T, dS K), dk/dv 4 (KQ^T, P^T dO, V dO^T, dS^T Q)."""
    plan = _plan(block_sizes, segment_ids.shape[1], interpret=True)
    total = 0
    for (bq, bk), n_mm in ((plan.fwd, 2),) + (((plan.dq, 3), (plan.dkv, 4)) if backward else ()):
        pairs, _ = count_computed_blocks(segment_ids, causal=causal, block_q=bq, block_k=bk,
                                         block_diffusion=block_diffusion)
        total += pairs * n_mm * 2 * bq * bk * head_dim
    return total * num_q_heads


# --------------------------------------------------------------------------------------------------
# operands: blocked (TPU) or whole (generic interpreter)
# --------------------------------------------------------------------------------------------------
#
# On TPU each input is a BlockSpec'd block that the pipeline DMAs into VMEM, one per grid step. The
# generic interpreter (interpret=True) instead carries every input through its grid loop and, for a
# blocked input, XLA copies the whole array on every step (measured: ~0.3 ms per step for 3 MB of
# inputs, more than the block's matmuls). Whole-array blocks are never copied, so in that mode the
# kernels receive whole arrays and slice their block themselves with pl.ds.


def _spec(whole: bool, shape, block_shape, index_map):
    if whole:
        return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))
    return pl.BlockSpec(block_shape, index_map)


def _seg_operands(seg_p, whole: bool):
    """Segment ids as (columns, rows). TPU: [B, Lp, 128] lane-replicated and [B, 8, Lp]
    sublane-replicated, so both orientations load as aligned tiles. Whole: [B, Lp] twice."""
    if whole:
        return seg_p, seg_p
    b, lp = seg_p.shape
    return (lax.broadcast_in_dim(seg_p, (b, lp, NUM_LANES), (0, 1)),
            lax.broadcast_in_dim(seg_p, (b, NUM_SUBLANES, lp), (0, 2)))


def _col_ids(ref, whole, b, start, n):
    """Ids of n consecutive positions as a column: [n, 128] lane-replicated, or [n, 1]."""
    return ref[b, pl.ds(start, n)][:, None] if whole else ref[...]


def _row_ids(ref, whole, b, start, n):
    """Ids of n consecutive positions as a row [1, n]."""
    return ref[b, pl.ds(start, n)][None, :] if whole else ref[0:1, :]


def _row_vec(ref, whole, b, h, start, n):
    """Per-query fp32 vector (lse, D) as a row [1, n]; blocked arrays are [B, Hq, 1, Lp]."""
    return ref[b, h, pl.ds(start, n)][None, :] if whole else ref[...]


def _col_vec(ref, whole, b, h, start, n):
    """Per-query fp32 vector as a column [n, 1]."""
    return ref[b, h, pl.ds(start, n)][:, None] if whole else ref[0][:, None]


def _tile(ref, whole, b, h, start, n):
    """Rows [start, start + n) of head h of batch row b: [n, D]."""
    return ref[b, h, pl.ds(start, n), :] if whole else ref[...]


# --------------------------------------------------------------------------------------------------
# in-kernel helpers
# --------------------------------------------------------------------------------------------------


def _lanes(x, width: int):
    """Widen a lane-replicated [n, 128] value to [n, width] (cheap tile copies on TPU)."""
    if width == NUM_LANES:
        return x
    if width < NUM_LANES:
        return x[:, :width]
    if width % NUM_LANES == 0:
        return pltpu.repeat(x, width // NUM_LANES, axis=1)
    return jnp.broadcast_to(x[:, :1], (x.shape[0], width))


def _mask(col_ids, row_ids, col_offset, row_offset, shape, causal: bool, rows_are_queries: bool,
          bd: bool = False):
    """[rows, cols] bool: same non-zero segment (and causal order; or the block-diffusion rule).
    col_ids: ids along the rows ([rows, 128] lane-replicated or [rows, 1]); row_ids: ids along the
    columns ([1, cols]); offsets: global positions of element (0, 0)."""
    ids = _lanes(col_ids, shape[1]) if col_ids.shape[1] == NUM_LANES else col_ids
    if bd:
        q, k = (ids, row_ids) if rows_are_queries else (row_ids, ids)
        mask = (_segment_of(q) == _segment_of(k)) & (q != 0) & (
            (k == q) | ((jnp.bitwise_and(k, 1) == 1) & (k < q)))
        return jnp.broadcast_to(mask, shape)
    mask = (ids == row_ids) & (ids != 0)
    if causal:
        r = col_offset + lax.broadcasted_iota(jnp.int32, shape, 0)
        c = row_offset + lax.broadcasted_iota(jnp.int32, shape, 1)
        mask = mask & ((r >= c) if rows_are_queries else (c >= r))
    return jnp.broadcast_to(mask, shape)


def _precision(dtype):
    # fp32 inputs must stay fp32 on the MXU (TPU default is bf16 passes); bf16 is exact anyway.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, precision=_precision(b.dtype),
                           preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, sm_scale, causal, bq, bk, nq, nk, group, whole, debug, bd=False):
    tables, refs = refs[:_NUM_TABLES], refs[_NUM_TABLES:]
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *refs = refs
    visits_ref = refs.pop(0) if debug else None
    m_scr, l_scr, acc_scr = refs
    # program_id is read here, outside pl.when: the generic interpreter cannot lower it in a branch.
    b, h, i, j = (pl.program_id(a) for a in range(4))
    hk = lax.div(h, group)
    head_dim = acc_scr.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    run, needs_mask = _pair_kind(tables, b, i, j, nq=nq, nk=nk, bq=bq, bk=bk, causal=causal, bd=bd)
    if debug:
        visits_ref[...] = jnp.where(run, 1, 0) * jnp.ones(visits_ref.shape, jnp.int32)

    def body(masked):
        q = _tile(q_ref, whole, b, h, i * bq, bq)
        k = _tile(k_ref, whole, b, hk, j * bk, bk)
        v = _tile(v_ref, whole, b, hk, j * bk, bk)
        s = _dot(q, k, _NT) * sm_scale                                # [bq, bk]
        if masked:
            mask = _mask(_col_ids(qseg_ref, whole, b, i * bq, bq),
                         _row_ids(kseg_ref, whole, b, j * bk, bk),
                         i * bq, j * bk, (bq, bk), causal, True, bd)
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_scr[...]                                           # [bq, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - _lanes(m_next, bk))
        if masked:  # a row with no visible key yet has m_next == MASK_VALUE, so exp gives 1
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_scr[...] = alpha * l_scr[...] + lax.broadcast_in_dim(
            jnp.sum(p, axis=-1), m_prev.shape, (0,))
        m_scr[...] = m_next
        acc_scr[...] = _lanes(alpha, head_dim) * acc_scr[...] + _dot(p.astype(v.dtype), v, _NN)

    _when_run(run, needs_mask, body)

    @pl.when(j == nk - 1)
    def _finish():
        l = l_scr[...]
        seen = l > 0.0  # False exactly on padding queries (a real query always sees itself)
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_scr[...] * _lanes(1.0 / l_safe, head_dim)).astype(o_ref.dtype)
        lse = jnp.where(seen, m_scr[...] + jnp.log(l_safe), 0.0)     # [bq, 128], lanes equal
        lse_ref[...] = jnp.transpose(lse)[0:1, :]                     # row [1, bq]


def _clamped(idx, t, tables):
    """Grid index clamped into the visited interval of row t: a skipped step repeats the block
    index of its neighbour, so the TPU pipeline issues no copy for it."""
    return jnp.minimum(jnp.maximum(idx, tables[-2][t]), tables[-1][t])


def _query_major_specs(q, k, v, seg_cols, seg_rows, *, bq, bk, group, nq, whole):
    """Block specs of the grid (B, Hq, q block i, k block j) that the forward and dq kernels share.

    K/V (and key segment ids) follow the clamped visit interval of query block i, so skipped steps repeat a
    block index and issue no copy. Returns (q_map, row_map for [B, Hq, 1, L] rows such as lse, specs of q,
    k, v, query segment ids and key segment ids).
    """
    d = q.shape[-1]

    def q_map(b_, h, i, j, *tabs):
        return b_, h, i, 0

    def kv_map(b_, h, i, j, *tabs):
        return b_, lax.div(h, group), _clamped(j, b_ * nq + i, tabs), 0

    def qseg_map(b_, h, i, j, *tabs):
        return b_, i, 0

    def kseg_map(b_, h, i, j, *tabs):
        return b_, 0, _clamped(j, b_ * nq + i, tabs)

    def row_map(b_, h, i, j, *tabs):
        return b_, h, 0, i

    specs = [
        _spec(whole, q.shape, (None, None, bq, d), q_map),
        _spec(whole, k.shape, (None, None, bk, d), kv_map),
        _spec(whole, v.shape, (None, None, bk, d), kv_map),
        _spec(whole, seg_cols.shape, (None, bq, NUM_LANES), qseg_map),
        _spec(whole, seg_rows.shape, (None, NUM_SUBLANES, bk), kseg_map),
    ]
    return q_map, row_map, specs


def _cost(q, k, causal: bool, *, matmuls: int) -> pl.CostEstimate:
    """XLA's cost model for one kernel: its [L, L, D] matmuls over every block pair (half when
    causal). An upper bound: the pairs that packing lets the kernel skip are only known at run time."""
    b, hq, lp, d = q.shape
    pairs = b * hq * lp * lp // (2 if causal else 1)
    sz = q.dtype.itemsize
    return pl.CostEstimate(flops=2 * matmuls * pairs * d, transcendentals=pairs,
                           bytes_accessed=(2 * q.size + 2 * k.size * (hq // k.shape[1])) * sz)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "plan", "interpret", "debug", "bd"))
def _fwd_padded(q, k, v, seg_p, *, causal, sm_scale, plan, interpret, debug=False, bd=False):
    b, hq, lp, d = q.shape
    group = hq // k.shape[1]
    bq, bk = plan.fwd
    nq, nk = lp // bq, lp // bk
    whole = interpret is True
    tables = _tables(seg_p, bq, bk, causal, inner="k", bd=bd)

    seg_cols, seg_rows = _seg_operands(seg_p, whole)
    q_map, lse_map, in_specs = _query_major_specs(q, k, v, seg_cols, seg_rows, bq=bq, bk=bk, group=group,
                                                  nq=nq, whole=whole)
    out_specs = [
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, 1, bq), lse_map),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, hq, lp, d), q.dtype),
        jax.ShapeDtypeStruct((b, hq, 1, lp), jnp.float32),
    ]
    if debug:  # which grid steps ran the compute branch (interpret mode only)
        out_specs.append(pl.BlockSpec((None, None, 1, 1), lambda b_, h, i, j, *_: (b_, h, i, j)))
        out_shape.append(jax.ShapeDtypeStruct((b, hq, nq, nk), jnp.int32))
    kernel = functools.partial(_fwd_kernel, sm_scale=sm_scale, causal=causal, bq=bq, bk=bk,
                               nq=nq, nk=nk, group=group, whole=whole, debug=debug, bd=bd)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(tables),
            grid=(b, hq, nq, nk),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # running max m
                pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # running denominator l
                pltpu.VMEM((bq, d), jnp.float32),          # unnormalised output
            ],
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=plan.vmem_limit),
        cost_estimate=_cost(q, k, causal, matmuls=2),
        interpret=interpret,
        name="masked_attention_fwd",
    )(*tables, q, k, v, seg_cols, seg_rows)
    return tuple(outs)


# --------------------------------------------------------------------------------------------------
# backward: dq
# --------------------------------------------------------------------------------------------------


def _dq_kernel(*refs, sm_scale, causal, bq, bk, nq, nk, group, whole, bd=False):
    tables, refs = refs[:_NUM_TABLES], refs[_NUM_TABLES:]
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, lse_ref, di_ref, do_ref, dq_ref, dq_scr = refs
    b, h, i, j = (pl.program_id(a) for a in range(4))
    hk = lax.div(h, group)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def body(masked):
        q = _tile(q_ref, whole, b, h, i * bq, bq)
        do = _tile(do_ref, whole, b, h, i * bq, bq)
        k = _tile(k_ref, whole, b, hk, j * bk, bk)
        v = _tile(v_ref, whole, b, hk, j * bk, bk)
        s = _dot(q, k, _NT) * sm_scale
        p = jnp.exp(s - _col_vec(lse_ref, whole, b, h, i * bq, bq))
        dp = _dot(do, v, _NT)
        ds = p * (dp - _col_vec(di_ref, whole, b, h, i * bq, bq))
        if masked:  # exp of a masked score may overflow: select, never multiply by the mask
            mask = _mask(_col_ids(qseg_ref, whole, b, i * bq, bq),
                         _row_ids(kseg_ref, whole, b, j * bk, bk),
                         i * bq, j * bk, (bq, bk), causal, True, bd)
            ds = jnp.where(mask, ds, 0.0)
        dq_scr[...] += _dot(ds.astype(k.dtype), k, _NN)

    _when_run(*_pair_kind(tables, b, i, j, nq=nq, nk=nk, bq=bq, bk=bk, causal=causal, bd=bd), body)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * sm_scale).astype(dq_ref.dtype)


def _row_operand(x, whole):
    """Per-query fp32 vector [B, Hq, Lp] as passed to the backward kernels."""
    return x if whole else x[:, :, None, :]


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "plan", "interpret", "bd"))
def _dq_padded(q, k, v, seg_p, lse, di, do, *, causal, sm_scale, plan, interpret, bd=False):
    b, hq, lp, d = q.shape
    group = hq // k.shape[1]
    bq, bk = plan.dq
    nq, nk = lp // bq, lp // bk
    whole = interpret is True
    tables = _tables(seg_p, bq, bk, causal, inner="k", bd=bd)

    seg_cols, seg_rows = _seg_operands(seg_p, whole)
    q_map, row_map, in_specs = _query_major_specs(q, k, v, seg_cols, seg_rows, bq=bq, bk=bk, group=group,
                                                  nq=nq, whole=whole)
    lse, di = _row_operand(lse, whole), _row_operand(di, whole)
    kernel = functools.partial(_dq_kernel, sm_scale=sm_scale, causal=causal, bq=bq, bk=bk,
                               nq=nq, nk=nk, group=group, whole=whole, bd=bd)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(tables),
            grid=(b, hq, nq, nk),
            in_specs=[
                *in_specs,
                _spec(whole, lse.shape, (None, None, 1, bq), row_map),
                _spec(whole, di.shape, (None, None, 1, bq), row_map),
                _spec(whole, do.shape, (None, None, bq, d), q_map),
            ],
            out_specs=pl.BlockSpec((None, None, bq, d), q_map),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=plan.vmem_limit),
        cost_estimate=_cost(q, k, causal, matmuls=3),
        interpret=interpret,
        name="masked_attention_dq",
    )(*tables, q, k, v, seg_cols, seg_rows, lse, di, do)


# --------------------------------------------------------------------------------------------------
# backward: dk, dv
# --------------------------------------------------------------------------------------------------


def _dkv_kernel(*refs, sm_scale, causal, bq, bk, nq, nk, group, whole, bd=False):
    tables, refs = refs[:_NUM_TABLES], refs[_NUM_TABLES:]
    (q_ref, k_ref, v_ref, qseg_ref, kseg_ref, lse_ref, di_ref, do_ref,
     dk_ref, dv_ref, dk_scr, dv_scr) = refs
    b, hk, j, g, i = (pl.program_id(a) for a in range(5))
    h = hk * group + g

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def body(masked):
        q = _tile(q_ref, whole, b, h, i * bq, bq)
        do = _tile(do_ref, whole, b, h, i * bq, bq)
        k = _tile(k_ref, whole, b, hk, j * bk, bk)
        v = _tile(v_ref, whole, b, hk, j * bk, bk)
        # Transposed scores [bk, bq]: per-query lse and D are rows here, no relayout needed.
        s_t = _dot(k, q, _NT) * sm_scale
        p_t = jnp.exp(s_t - _row_vec(lse_ref, whole, b, h, i * bq, bq))
        if masked:
            mask = _mask(_col_ids(kseg_ref, whole, b, j * bk, bk),
                         _row_ids(qseg_ref, whole, b, i * bq, bq),
                         j * bk, i * bq, (bk, bq), causal, False, bd)
            p_t = jnp.where(mask, p_t, 0.0)
        dv_scr[...] += _dot(p_t.astype(do.dtype), do, _NN)
        ds_t = p_t * (_dot(v, do, _NT) - _row_vec(di_ref, whole, b, h, i * bq, bq))
        dk_scr[...] += _dot(ds_t.astype(q.dtype), q, _NN)

    _when_run(*_pair_kind(tables, b, i, j, nq=nq, nk=nk, bq=bq, bk=bk, causal=causal, bd=bd), body)

    @pl.when((g == group - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "plan", "interpret", "bd"))
def _dkv_padded(q, k, v, seg_p, lse, di, do, *, causal, sm_scale, plan, interpret, bd=False):
    b, hq, lp, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    bq, bk = plan.dkv
    nq, nk = lp // bq, lp // bk
    whole = interpret is True
    tables = _tables(seg_p, bq, bk, causal, inner="q", bd=bd)

    def q_map(b_, hk, j, g, i, *tabs):
        return b_, hk * group + g, _clamped(i, b_ * nk + j, tabs), 0

    def kv_map(b_, hk, j, g, i, *tabs):
        return b_, hk, j, 0

    def qseg_map(b_, hk, j, g, i, *tabs):
        return b_, 0, _clamped(i, b_ * nk + j, tabs)

    def kseg_map(b_, hk, j, g, i, *tabs):
        return b_, j, 0

    def row_map(b_, hk, j, g, i, *tabs):
        return b_, hk * group + g, 0, _clamped(i, b_ * nk + j, tabs)

    # Roles swap here: keys are the rows (column-form ids), queries the columns (row-form ids).
    seg_cols, seg_rows = _seg_operands(seg_p, whole)
    lse, di = _row_operand(lse, whole), _row_operand(di, whole)
    kernel = functools.partial(_dkv_kernel, sm_scale=sm_scale, causal=causal, bq=bq, bk=bk,
                               nq=nq, nk=nk, group=group, whole=whole, bd=bd)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(tables),
            grid=(b, hkv, nk, group, nq),
            in_specs=[
                _spec(whole, q.shape, (None, None, bq, d), q_map),
                _spec(whole, k.shape, (None, None, bk, d), kv_map),
                _spec(whole, v.shape, (None, None, bk, d), kv_map),
                _spec(whole, seg_rows.shape, (None, NUM_SUBLANES, bq), qseg_map),
                _spec(whole, seg_cols.shape, (None, bk, NUM_LANES), kseg_map),
                _spec(whole, lse.shape, (None, None, 1, bq), row_map),
                _spec(whole, di.shape, (None, None, 1, bq), row_map),
                _spec(whole, do.shape, (None, None, bq, d), q_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
            ],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32),
                            pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=plan.vmem_limit),
        cost_estimate=_cost(q, k, causal, matmuls=4),
        interpret=interpret,
        name="masked_attention_dkv",
    )(*tables, q, k, v, seg_rows, seg_cols, lse, di, do)


# --------------------------------------------------------------------------------------------------
# public backend functions
# --------------------------------------------------------------------------------------------------


def _check(q, k, v, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"pallas attention: q, k, v must be [B, H, L, D]; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    b, hq, l, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (l, d):
        raise ValueError(f"pallas attention: k {k.shape} / v {v.shape} do not fit q {q.shape}")
    if hq % k.shape[1]:
        raise ValueError(f"pallas attention: query heads {hq} not a multiple of kv heads "
                         f"{k.shape[1]}")
    if segment_ids.shape != (b, l):
        raise ValueError(f"pallas attention: segment_ids {segment_ids.shape} must be [B, L] = "
                         f"{(b, l)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"pallas attention: segment_ids must be int32, got {segment_ids.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"pallas attention: q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    return l, d


def _pad_seq(x, lp, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, lp - x.shape[axis])
    return jnp.pad(x, pad) if lp != x.shape[axis] else x


def attention_fwd(q, k, v, segment_ids, *, causal: bool, sm_scale: float | None,
                  block_sizes=None, interpret: bool, chip=None, block_diffusion: bool = False):
    """Returns (o [B,Hq,L,D] in q's dtype, lse [B,Hq,L] fp32, 0 on padding queries). `chip`: the
    TPU generation to size blocks and VMEM for (kernels.tpu; default: the compile target or this
    device). block_diffusion: segment_ids are block-diffusion ids (kernels/__init__.py)."""
    l, d = _check(q, k, v, segment_ids)
    sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
    plan = _plan(block_sizes, l, interpret, chip=chip, head_dim=d, dtype=q.dtype)
    lp = plan.padded_len
    seg_p = _pad_seq(segment_ids.astype(jnp.int32), lp, 1)
    o, lse = _fwd_padded(_pad_seq(q, lp, 2), _pad_seq(k, lp, 2), _pad_seq(v, lp, 2), seg_p,
                         causal=bool(causal), sm_scale=sm_scale, plan=plan, interpret=interpret,
                         bd=bool(block_diffusion))
    return o[:, :, :l], lse[:, :, 0, :l]


def attention_bwd(q, k, v, segment_ids, o, lse, do, *, causal: bool, sm_scale: float | None,
                  block_sizes=None, interpret: bool, chip=None, block_diffusion: bool = False):
    """Returns (dq, dk, dv) in the dtypes of q, k, v, from the forward's o and lse."""
    l, d = _check(q, k, v, segment_ids)
    sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
    plan = _plan(block_sizes, l, interpret, chip=chip, head_dim=d, dtype=q.dtype)
    lp = plan.padded_len
    seg_p = _pad_seq(segment_ids.astype(jnp.int32), lp, 1)
    # D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: one cheap pass here instead of in both kernels.
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    lse_p, di_p = (_pad_seq(x.astype(jnp.float32), lp, 2) for x in (lse, di))
    qp, kp, vp, dop = (_pad_seq(x, lp, 2) for x in (q, k, v, do))
    static = dict(causal=bool(causal), sm_scale=sm_scale, plan=plan, interpret=interpret,
                  bd=bool(block_diffusion))
    dq = _dq_padded(qp, kp, vp, seg_p, lse_p, di_p, dop, **static)
    dk, dv = _dkv_padded(qp, kp, vp, seg_p, lse_p, di_p, dop, **static)
    return dq[:, :, :l], dk[:, :, :l], dv[:, :, :l]


def attention_fwd_block_visits(q, k, v, segment_ids, *, causal: bool, sm_scale=None,
                               block_sizes=None, block_diffusion: bool = False):
    """Debug (interpret mode): int32 [B, Hq, nq, nk], 1 where the forward kernel ran a block pair.
    Lets tests check the kernel itself skips what `block_schedule` says, not just the table."""
    l, d = _check(q, k, v, segment_ids)
    sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
    plan = _plan(block_sizes, l, True)
    lp = plan.padded_len
    seg_p = _pad_seq(segment_ids.astype(jnp.int32), lp, 1)
    *_, visits = _fwd_padded(_pad_seq(q, lp, 2), _pad_seq(k, lp, 2), _pad_seq(v, lp, 2), seg_p,
                             causal=bool(causal), sm_scale=sm_scale, plan=plan, interpret=True,
                             debug=True, bd=bool(block_diffusion))
    return visits


# The binding (kernels/binding.py) finds these through the registry: `interpret` runs the kernels
# with Pallas' interpreter (CPU, inside the torch_xla graph), `mosaic` compiles them for TPU.
from kernels import register_backend  # noqa: E402  (torch-free registry)

register_backend("attention", "interpret", attention_fwd, attention_bwd, static={"interpret": True})
register_backend("attention", "mosaic", attention_fwd, attention_bwd, static={"interpret": False})
