"""Pallas fused masked cross-entropy over the LM head (Mosaic on TPU, interpret mode on CPU).

    loss_sum = sum_i w_i * (logsumexp_v(h_i . W_v) - h_i . W_{t_i})   over rows with w_i > 0

computed without ever materialising the [N, V] logits, and only for the loss positions:

* Compaction: the wrappers move the loss rows (w > 0) to the front with a stable cumsum scatter
  (static shapes), zero the rows past the count, and pass the count to the kernels by scalar
  prefetch. Token blocks past ``cdiv(count, block_tokens)`` are skipped at run time: their compute
  and their DMAs sit under ``pl.when``, and the per-token row index maps clamp to the last live
  block (no new copy). Work follows the number of loss positions, not N.
* Layout: logits are computed vocab-major, ``s^T = W_blk . h_blk^T`` of shape [block_vocab,
  block_tokens], so every per-token quantity (lse, target, weight) is a lane-dense [1, block_tokens]
  row and the vocab reductions run over sublanes.
* Memory traffic: hidden, W and both gradients stay in HBM (``memory_space=ANY``) and move by
  explicit double-buffered DMA (the next block is prefetched while the current one computes). W is
  never padded or copied per call: the last vocab slab is clamped to end at V and overlaps its
  predecessor, and the rows it re-reads are masked out with ``jnp.where`` (a block owns the rows
  ``>= j * block_vocab``), so no vocab row counts twice. Only a vocabulary that is not a multiple of
  128 is padded (Qwen's 151936 = 1187 * 128 is not).
* Forward: (token block, vocab block) grid, online log-sum-exp in fp32 scratch; saves lse [N]. The
  target logit is a row-wise dot in the wrapper.
* Backward: one kernel, (vocab block, token block) grid, recomputing each [bv, bt] logit block from
  the saved lse, scaled by ``w_i * g`` before any reduction, and feeding both gradients from it:
  d_weight accumulates over token blocks in an fp32 VMEM slab written once per vocab block (in W's
  dtype, cast once); d_hidden accumulates over vocab blocks in fp32 (in VMEM when one token block is
  live, else read-modify-written in HBM with double buffering). Four matmuls per live block in all,
  against the naive path's three over every row.

Public API (module-level, the kernels contract's backend convention):
    cross_entropy_fwd(hidden, weight, targets, token_weight, *, block_sizes=None, interpret)
        -> (loss_sum, lse)
    cross_entropy_bwd(hidden, weight, targets, token_weight, lse, g, *, block_sizes=None, interpret)
        -> (d_hidden, d_weight)
    cross_entropy(hidden, weight, targets, token_weight, block_sizes=None, interpret=True)
        custom_vjp convenience for plain JAX
    computed_blocks(...)   debug: how many grid steps of each kernel ran their matmuls
Pure JAX + Pallas; no torch import.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_F32 = jnp.float32
_LANES = 128  # TPU lane width: vocab is padded / blocked in multiples of it
_NT_DIMS = (((1,), (1,)), ((), ()))  # a[m,k] . b[n,k] -> [m,n]
_TN_DIMS = (((0,), (0,)), ((), ()))  # a[k,m] . b[k,n] -> [m,n]
_NN_DIMS = (((1,), (0,)), ((), ()))  # a[m,k] . b[k,n] -> [m,n]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. block_tokens: compacted loss rows per block (both kernels; also the granularity
    of the skipping); block_vocab: vocab rows per block in the forward; block_vocab_bwd: in the
    backward. All must be multiples of 128 (TPU lanes; per-token vectors are lane-dense rows).
    Shapes smaller than a block use one block of the (padded) full size instead."""

    block_tokens: int = 512
    block_vocab: int = 512
    block_vocab_bwd: int = 512

    def __post_init__(self):
        for name in ("block_tokens", "block_vocab", "block_vocab_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % _LANES:
                raise ValueError(
                    f"BlockSizes.{name} must be a positive multiple of {_LANES}, got {value!r}")


# For Mosaic: at bf16, H=2048 these need ~11 MiB (forward) and ~30 MiB (backward) of VMEM; the
# kernels raise the scoped VMEM limit accordingly (see _vmem_limit). Not yet tuned on a TPU.
DEFAULT_BLOCK_SIZES = BlockSizes()
# For the CPU interpreter: each grid step is one XLA while-loop iteration with its own copies, so
# large vocab blocks win. Measured fwd+bwd at N=4096, H=1024, V=151936, 819 loss rows (2 cores, CPU
# seconds): tokens/vocab 1024/2048 ~31, 1024/4096 ~31-36, 1024/1024 ~35-38, 256/2048 ~43,
# 128/2048 ~60 (small token blocks re-stream W per block and run small matmuls). 512 token rows:
# a train step has a few hundred loss rows, and a 1024-row block computed twice the rows it needed
# (the qwen3-tiny step's loss at ~450 loss rows: 3.6 s at 1024, 2.7-2.9 s at 384-512).
INTERPRET_BLOCK_SIZES = BlockSizes(block_tokens=512, block_vocab=2048, block_vocab_bwd=2048)


def resolve_block_sizes(block_sizes: BlockSizes | None, interpret) -> BlockSizes:
    if block_sizes is None:
        return INTERPRET_BLOCK_SIZES if interpret else DEFAULT_BLOCK_SIZES
    if isinstance(block_sizes, Mapping):  # model.loss_kernel_config arrives as a plain mapping
        return BlockSizes(**block_sizes)
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    return block_sizes


def _cdiv(a, b):
    return (a + b - 1) // b


def _round_up(a, b):
    return _cdiv(a, b) * b


# --------------------------------------------------------------------------------------------------
# static geometry
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Geometry:
    n: int  # rows given
    h: int
    v: int  # real vocab
    v_pad: int  # vocab as stored for the kernels (multiple of 128)
    bt: int  # token block
    n_pad: int  # compacted rows, multiple of bt
    nt: int

    def vocab(self, bv: int):
        """(effective block, number of blocks, rows of the last block that it owns)."""
        bv = min(bv, self.v_pad)
        nv = _cdiv(self.v_pad, bv)
        return bv, nv, self.v_pad - (nv - 1) * bv


def _geometry(hidden, weight, targets, token_weight, bs: BlockSizes) -> _Geometry:
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"pallas_cross_entropy: hidden must be [N, H] and weight [V, H] with the same H; got "
            f"hidden {hidden.shape}, weight {weight.shape}")
    n, h = hidden.shape
    v = weight.shape[0]
    if targets.shape != (n,) or token_weight.shape != (n,):
        raise ValueError(
            f"pallas_cross_entropy: targets {targets.shape} and token_weight {token_weight.shape} "
            f"must be [N] = ({n},)")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"pallas_cross_entropy: targets must be integer, got {targets.dtype}")
    for name, x in (("hidden", hidden), ("weight", weight)):
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            raise TypeError(
                f"pallas_cross_entropy: {name} must be float32 or bfloat16, got {x.dtype}")
    if n == 0 or v == 0 or h == 0:
        raise ValueError(f"pallas_cross_entropy: empty input (N={n}, V={v}, H={h})")
    # A single token block covering everything may be any multiple of 16 (bf16 sublane tile);
    # otherwise blocks are block_tokens rows (multiple of 128, so per-token rows stay lane-dense).
    bt = bs.block_tokens if n > bs.block_tokens else _round_up(n, 16)
    n_pad = _round_up(n, bt)
    return _Geometry(n=n, h=h, v=v, v_pad=_round_up(v, _LANES), bt=bt, n_pad=n_pad,
                     nt=n_pad // bt)


def _padded_weight(weight, geo: _Geometry):
    # Only vocabularies that are not a multiple of 128 are copied (Qwen's 151936 = 1187 * 128 is
    # not); the zero rows are excluded from the lse by the kernels' `row < v` mask.
    if geo.v_pad == geo.v:
        return weight
    return jnp.pad(weight, ((0, geo.v_pad - geo.v), (0, 0)))


# --------------------------------------------------------------------------------------------------
# compaction of loss positions
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Compacted:
    count: jax.Array  # [1] int32: number of loss rows (scalar prefetch)
    dest: jax.Array  # [N] int32: compacted row of each original row
    live: jax.Array  # [n_pad] bool: compacted row < count
    hidden: jax.Array  # [n_pad, H]: loss rows first, then zeros
    targets: jax.Array  # [1, n_pad] int32
    weights: jax.Array  # [1, n_pad] fp32, 0 past the count


def _compact(hidden, targets, token_weight, geo: _Geometry) -> _Compacted:
    """Stable partition: loss rows (w > 0) in their original order, then the others."""
    active = token_weight > 0
    a = active.astype(jnp.int32)
    count = jnp.sum(a)
    dest = jnp.where(active, jnp.cumsum(a) - 1, count + jnp.cumsum(1 - a) - 1)
    src = jnp.zeros((geo.n_pad,), jnp.int32).at[dest].set(jnp.arange(geo.n, dtype=jnp.int32))
    live = jnp.arange(geo.n_pad, dtype=jnp.int32) < count
    # Rows past the count are zeroed, not left as whatever the model produced there: the kernels
    # multiply them by zero weights, and 0 * inf would be NaN.
    h = jnp.where(live[:, None], jnp.take(hidden, src, axis=0), jnp.zeros((), hidden.dtype))
    t = jnp.where(live, jnp.take(targets.astype(jnp.int32), src), 0)
    w = jnp.where(live, jnp.take(token_weight.astype(_F32), src), 0.0)
    return _Compacted(count=count.reshape(1), dest=dest, live=live, hidden=h,
                      targets=t.reshape(1, geo.n_pad), weights=w.reshape(1, geo.n_pad))


def _live_blocks(count_ref, bt):
    return (count_ref[0] + bt - 1) // bt


# --------------------------------------------------------------------------------------------------
# kernel pieces
# --------------------------------------------------------------------------------------------------


def _w_slab_copy(w_hbm, w_buf, sems, j, slot, *, bv, v_pad):
    """DMA descriptor for vocab block j -> w_buf[slot] (the last block clamped to end at v_pad)."""
    start = pl.multiple_of(jnp.minimum(j * bv, v_pad - bv), _LANES)
    return pltpu.make_async_copy(w_hbm.at[pl.ds(start, bv)], w_buf.at[slot], sems.at[slot])


def _h_block_copy(h_hbm, h_buf, sems, i, slot, *, bt):
    """DMA descriptor for token block i of the compacted hidden -> h_buf[slot]."""
    start = pl.multiple_of(i * bt, bt)
    return pltpu.make_async_copy(h_hbm.at[pl.ds(start, bt)], h_buf.at[slot], sems.at[slot])


def _stream(copy, step, n_steps, block, next_block):
    """Double-buffered stream over the live steps 0..n_steps-1 of a grid: step s reads slot s % 2,
    and the block of step s + 1 is prefetched into the other slot while step s computes. Call on
    live steps only, in order. Returns the slot holding `block`."""
    slot = step % 2

    @pl.when(step == 0)
    def _():
        copy(block, slot).start()

    @pl.when(step + 1 < n_steps)
    def _():
        copy(next_block, 1 - slot).start()

    copy(block, slot).wait()
    return slot


def _block_rows(j, *, bv, v_pad, v):
    """(vocab row of each slab row [bv, 1], which of them this block owns [bv, 1])."""
    start = jnp.minimum(j * bv, v_pad - bv)
    rows = start + jax.lax.broadcasted_iota(jnp.int32, (bv, 1), 0)
    return rows, (rows >= j * bv) & (rows < v)


def _dot(a, b, dims):
    # fp32 operands stay fp32 on the MXU (Mosaic's default would be bf16 passes).
    prec = jax.lax.Precision.HIGHEST if a.dtype == _F32 and b.dtype == _F32 else None
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=_F32)


def _row_pieces(bt):
    """Static (offset, size) row ranges for a partially live token block: halving pieces down to
    128 rows, e.g. bt=1024 -> (0,512) (512,256) (768,128) (896,128). Running the prefix of pieces
    that holds live rows computes 896 rows for 819 live ones instead of the whole block."""
    if bt % _LANES or bt <= _LANES:
        return ((0, bt),)
    pieces, off, rem = [], 0, bt // _LANES
    while rem > 1:
        size = rem // 2
        pieces.append((off * _LANES, size * _LANES))
        off, rem = off + size, rem - size
    pieces.append((off * _LANES, _LANES))
    return tuple(pieces)


def computed_rows(n: int, n_loss: int, block_sizes: BlockSizes) -> int:
    """Token rows that go through the matmuls (per vocab block) for N=n rows of which n_loss are
    loss positions: whole live token blocks, then the live pieces of the last one. For FLOP
    accounting: the forward does 2 * rows * H * V_pad FLOPs, the backward three times that."""
    bt = block_sizes.block_tokens if n > block_sizes.block_tokens else _round_up(n, 16)
    full, rest = divmod(n_loss, bt)
    rows = full * bt
    if rest:
        pieces = _row_pieces(bt)
        rows += bt if len(pieces) == 1 else sum(size for off, size in pieces if rest > off)
    return rows


def _over_live_rows(live_rows, bt, body):
    """Call body(offset, size) on static row ranges covering the first live_rows (>= 1) rows of a
    token block: the whole block when it is full, else the pieces of _row_pieces that hold live
    rows. Dead rows beyond the last piece cost nothing."""
    pieces = _row_pieces(bt)
    if len(pieces) == 1:
        body(0, bt)
        return
    pl.when(live_rows >= bt)(functools.partial(body, 0, bt))

    @pl.when(live_rows < bt)
    def _():
        for off, size in pieces:
            pl.when(live_rows > off)(functools.partial(body, off, size))


def _count(counter_ref, first, rows=None):
    """Debug counter (SMEM int32[2]): grid steps that computed, and rows that went through the
    matmuls (summed over steps)."""
    if counter_ref is None:
        return
    if rows is None:
        @pl.when(first)
        def _():
            counter_ref[0] = 0
            counter_ref[1] = 0
    else:
        counter_ref[1] += rows


# The big operands (compacted hidden, W, the gradients) stay in HBM (memory_space=ANY) and move by
# explicit DMA. Besides giving the kernels control over the ragged last vocab slab, this keeps the
# CPU interpreter fast: it threads every blocked operand through its grid loop and writes each
# block back, which made XLA copy the whole hidden array twice per grid step.


# ---- forward -------------------------------------------------------------------------------------


def _fwd_kernel(count_ref, h_hbm, w_hbm, lse_ref, *rest, bt, bv, nv, v_pad, v, count_blocks):
    """Grid (token block i, vocab block j), vocab inner: online log-sum-exp in fp32 scratch. The
    hidden block is fetched once per token block (the next one prefetched), W slabs every step."""
    if count_blocks:
        counter_ref, *rest = rest
    else:
        counter_ref = None
    h_buf, h_sems, w_buf, w_sems, m_sc, l_sc = rest
    i, j = pl.program_id(0), pl.program_id(1)
    live = _live_blocks(count_ref, bt)
    _count(counter_ref, (i == 0) & (j == 0))

    @pl.when(i < live)
    def _():
        h_copy = functools.partial(_h_block_copy, h_hbm, h_buf, h_sems, bt=bt)
        w_copy = functools.partial(_w_slab_copy, w_hbm, w_buf, w_sems, bv=bv, v_pad=v_pad)
        h_slot = i % 2

        @pl.when(j == 0)
        def _():
            _stream(h_copy, i, live, i, i + 1)
            m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
            l_sc[...] = jnp.zeros(l_sc.shape, _F32)

        w_slot = _stream(w_copy, i * nv + j, live * nv, j, jnp.where(j + 1 == nv, 0, j + 1))
        owned = _block_rows(j, bv=bv, v_pad=v_pad, v=v)[1]

        def rows(off, size):
            s = _dot(w_buf[w_slot], h_buf[h_slot, off:off + size, :], _NT_DIMS)  # [bv, size]
            s = jnp.where(owned, s, -jnp.inf)  # the last slab's re-read rows, vocab padding
            m_prev = m_sc[:, off:off + size]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=0, keepdims=True))  # a block owns a row
            l_sc[:, off:off + size] = (l_sc[:, off:off + size] * jnp.exp(m_prev - m_new)
                                       + jnp.sum(jnp.exp(s - m_new), axis=0, keepdims=True))
            m_sc[:, off:off + size] = m_new
            _count(counter_ref, None, size)

        _over_live_rows(count_ref[0] - i * bt, bt, rows)
        if counter_ref is not None:
            counter_ref[0] += 1

        @pl.when(j == nv - 1)
        def _():
            lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


# ---- backward ------------------------------------------------------------------------------------


def _dlogits(w_slab, h, t_row, lse_row, coef_row, owned, rows):
    """d loss / d s^T for one [bv, size] block: coef * (softmax - onehot) on owned rows, else 0."""
    s = _dot(w_slab, h, _NT_DIMS)
    p = jnp.exp(s - lse_row)
    d = p - jnp.where(rows == t_row, 1.0, 0.0)
    return jnp.where(owned, d * coef_row, 0.0)


def _bwd_kernel(count_ref, t_ref, lse_ref, c_ref, h_hbm, w_hbm, dh_hbm, dw_hbm, *rest, bt, bv, nv,
                v_pad, v, tail, count_blocks):
    """Grid (vocab block j, token block i), tokens inner. Per live step one recomputed [bv, bt]
    d_logits block feeds both gradients:
      d_weight slab j: fp32 VMEM accumulator over token blocks, cast and written once per slab;
      d_hidden block i: fp32, accumulated over vocab blocks. With one live token block it stays in
        VMEM; with more it is read-modified-written in HBM, double-buffered (the next step's block
        is prefetched while this one computes, each write is waited for one step later)."""
    if count_blocks:
        counter_ref, *rest = rest
    else:
        counter_ref = None
    h_buf, h_sems, w_buf, w_sems, dw_acc, dw_out, dw_sem, dh_buf, dh_rsems, dh_wsems = rest
    j, i = pl.program_id(0), pl.program_id(1)
    live = _live_blocks(count_ref, bt)
    w_slot = j % 2
    w_copy = functools.partial(_w_slab_copy, w_hbm, w_buf, w_sems, bv=bv, v_pad=v_pad)
    h_copy = functools.partial(_h_block_copy, h_hbm, h_buf, h_sems, bt=bt)
    _count(counter_ref, (i == 0) & (j == 0))

    # ---- W slab j: fetched at the first token step of each vocab block, j + 1 prefetched.
    @pl.when(i == 0)
    def _():
        dw_acc[...] = jnp.zeros(dw_acc.shape, _F32)

        @pl.when(live > 0)  # no loss rows: W is never read, the slabs written are zeros
        def _():
            _stream(w_copy, j, nv, j, j + 1)

    # ---- the live steps
    def dh_copy(slot, block, to_hbm):
        hbm = dh_hbm.at[pl.ds(pl.multiple_of(block * bt, bt), bt)]
        if to_hbm:
            return pltpu.make_async_copy(dh_buf.at[slot], hbm, dh_wsems.at[slot])
        return pltpu.make_async_copy(hbm, dh_buf.at[slot], dh_rsems.at[slot])

    @pl.when(i < live)
    def _():
        step = j * live + i
        nxt_i = jnp.where(i + 1 == live, 0, i + 1)
        nxt_j = jnp.where(i + 1 == live, j + 1, j)
        h_slot = _stream(h_copy, step, nv * live, i, nxt_i)
        # One live token block: its d_hidden stays in VMEM slot 0 across the vocab blocks. More:
        # slot step % 2 holds this step's block, read back from HBM unless this is its first visit.
        single = live == 1
        slot = jnp.where(single, 0, step % 2)

        @pl.when(jnp.logical_not(single))
        def _():
            @pl.when(step > 0)
            def _():
                dh_copy(1 - slot, 0, True).wait()  # the previous step's write-back

            @pl.when((nxt_j > 0) & (nxt_j < nv))
            def _():
                dh_copy(1 - slot, nxt_i, False).start()  # prefetch the next step's partial sum

            @pl.when(j > 0)
            def _():
                dh_copy(slot, i, False).wait()

        w = w_buf[w_slot]
        vrows, owned = _block_rows(j, bv=bv, v_pad=v_pad, v=v)

        def rows(off, size):
            h = h_buf[h_slot, off:off + size, :]
            d = _dlogits(w, h, t_ref[:, off:off + size], lse_ref[:, off:off + size],
                         c_ref[:, off:off + size], owned, vrows)
            dw_acc[...] += _dot(d.astype(h.dtype), h, _NN_DIMS)  # [bv, H]
            dh_part = _dot(d.astype(w.dtype), w, _TN_DIMS)  # [size, H]

            @pl.when(j == 0)
            def _():
                dh_buf[slot, off:off + size, :] = dh_part

            @pl.when(j > 0)
            def _():
                dh_buf[slot, off:off + size, :] += dh_part

            _count(counter_ref, None, size)

        _over_live_rows(count_ref[0] - i * bt, bt, rows)
        if counter_ref is not None:
            counter_ref[0] += 1

        @pl.when(single & (j == nv - 1))
        def _():
            c = dh_copy(0, 0, True)
            c.start()
            c.wait()

        @pl.when(jnp.logical_not(single))
        def _():
            write = dh_copy(slot, i, True)
            write.start()

            @pl.when(step == nv * live - 1)
            def _():
                write.wait()

    # ---- d_weight slab j is final after the last live token block (at once when there is none).
    # Its write-back is asynchronous and waited for one vocab block later, before dw_out is reused.
    def dw_copy(rows_from, n_rows, hbm_start):
        return pltpu.make_async_copy(dw_out.at[pl.ds(rows_from, n_rows)],
                                     dw_hbm.at[pl.ds(hbm_start, n_rows)], dw_sem)

    @pl.when(i == jnp.maximum(live, 1) - 1)
    def _():
        @pl.when(j > 0)
        def _():
            dw_copy(0, bv, 0).wait()

        dw_out[...] = dw_acc[...].astype(dw_out.dtype)

        @pl.when(j < nv - 1)
        def _():
            dw_copy(0, bv, pl.multiple_of(j * bv, _LANES)).start()

        @pl.when(j == nv - 1)
        def _():
            # The last slab starts before (nv-1)*bv; only its last `tail` rows are its own.
            c = dw_copy(bv - tail, tail, v_pad - tail)
            c.start()
            c.wait()


# --------------------------------------------------------------------------------------------------
# pallas_call builders
# --------------------------------------------------------------------------------------------------


def _vmem_limit(*nbytes):
    # Buffers + scratch + the [bv, bt] fp32 temporaries, with headroom, within what current TPU
    # generations offer (Mosaic's default scoped limit is 16-32 MiB).
    return int(min(max(32 << 20, 3 * sum(nbytes) // 2), 64 << 20))


def _compiler_params(ndims, vmem):
    # "arbitrary" everywhere: blocks are prefetched across grid steps, which needs sequential order.
    return pltpu.CompilerParams(dimension_semantics=("arbitrary",) * ndims, vmem_limit_bytes=vmem)


def _tok_row_spec(bt, token_axis):
    def index_map(*idx):
        *grid_idx, count_ref = idx
        i = grid_idx[token_axis]
        live = (count_ref[0] + bt - 1) // bt
        return 0, jnp.minimum(i, jnp.maximum(live - 1, 0))
    return pl.BlockSpec((1, bt), index_map)


_ANY_SPEC = pl.BlockSpec(memory_space=pltpu.ANY)
_COUNTER_SPEC = pl.BlockSpec(memory_space=pltpu.SMEM)
_COUNTER_SHAPE = jax.ShapeDtypeStruct((2,), jnp.int32)


def _double_buffers(bt: int, bv: int, h: int, hidden_dtype, weight_dtype) -> list:
    """Scratch both kernels stream through: two VMEM slots (and their DMA semaphores) for a token
    block of hidden rows and for a vocab block of weight rows, filled one step ahead."""
    return [pltpu.VMEM((2, bt, h), hidden_dtype), pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((2, bv, h), weight_dtype), pltpu.SemaphoreType.DMA((2,))]


def _fwd_call(c: _Compacted, w, geo: _Geometry, bs: BlockSizes, interpret, count_blocks=False):
    bt, h = geo.bt, geo.h
    bv, nv, _ = geo.vocab(bs.block_vocab)
    isz, hsz = w.dtype.itemsize, c.hidden.dtype.itemsize
    out_specs = [_tok_row_spec(bt, 0)]
    out_shape = [jax.ShapeDtypeStruct((1, geo.n_pad), _F32)]
    if count_blocks:
        out_specs.append(_COUNTER_SPEC)
        out_shape.append(_COUNTER_SHAPE)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, bt=bt, bv=bv, nv=nv, v_pad=geo.v_pad, v=geo.v,
                          count_blocks=count_blocks),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(geo.nt, nv),
            in_specs=[_ANY_SPEC, _ANY_SPEC],
            out_specs=out_specs,
            scratch_shapes=[
                *_double_buffers(bt, bv, h, c.hidden.dtype, w.dtype),
                pltpu.VMEM((1, bt), _F32),
                pltpu.VMEM((1, bt), _F32),
            ],
        ),
        out_shape=out_shape,
        compiler_params=_compiler_params(2, _vmem_limit(
            2 * bt * h * hsz, 2 * bv * h * isz, 3 * bv * bt * 4)),
        # Upper bounds: the live fraction of the token blocks is only known at run time.
        cost_estimate=pl.CostEstimate(
            flops=2 * geo.n_pad * geo.v_pad * h, transcendentals=geo.n_pad * geo.v_pad,
            bytes_accessed=geo.nt * geo.v_pad * h * isz + geo.n_pad * h * hsz),
        interpret=interpret,
        name="masked_ce_fwd",
    )(c.count, c.hidden, w)
    return out if count_blocks else out[0]


def _bwd_call(c: _Compacted, w, lse_c, coef_c, geo: _Geometry, bs: BlockSizes, interpret,
              count_blocks=False):
    bt, h = geo.bt, geo.h
    bv, nv, tail = geo.vocab(bs.block_vocab_bwd)
    isz, hsz = w.dtype.itemsize, c.hidden.dtype.itemsize
    out_specs = [_ANY_SPEC, _ANY_SPEC]
    out_shape = [jax.ShapeDtypeStruct((geo.n_pad, h), _F32),  # d_hidden, fp32 partial sums
                 jax.ShapeDtypeStruct((geo.v_pad, h), w.dtype)]
    if count_blocks:
        out_specs.append(_COUNTER_SPEC)
        out_shape.append(_COUNTER_SHAPE)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, bt=bt, bv=bv, nv=nv, v_pad=geo.v_pad, v=geo.v, tail=tail,
                          count_blocks=count_blocks),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(nv, geo.nt),
            in_specs=[_tok_row_spec(bt, 1), _tok_row_spec(bt, 1), _tok_row_spec(bt, 1),
                      _ANY_SPEC, _ANY_SPEC],
            out_specs=out_specs,
            scratch_shapes=[
                *_double_buffers(bt, bv, h, c.hidden.dtype, w.dtype),
                pltpu.VMEM((bv, h), _F32),
                pltpu.VMEM((bv, h), w.dtype),
                pltpu.SemaphoreType.DMA(()),
                pltpu.VMEM((2, bt, h), _F32),
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.SemaphoreType.DMA((2,)),
            ],
        ),
        out_shape=out_shape,
        compiler_params=_compiler_params(2, _vmem_limit(
            2 * bt * h * hsz, 3 * bv * h * isz, bv * h * 4, 3 * bt * h * 4, 4 * bv * bt * 4)),
        cost_estimate=pl.CostEstimate(
            flops=6 * geo.n_pad * geo.v_pad * h, transcendentals=geo.n_pad * geo.v_pad,
            bytes_accessed=(2 * geo.v_pad * h * isz + nv * geo.n_pad * h * hsz
                            + 2 * nv * geo.n_pad * h * 4)),
        interpret=interpret,
        name="masked_ce_bwd",
    )(c.count, c.targets, lse_c, coef_c, c.hidden, w)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def cross_entropy_fwd(hidden, weight, targets, token_weight, *,
                      block_sizes: BlockSizes | None = None, interpret):
    """Returns (loss_sum fp32 scalar, lse [N] fp32; 0 on rows with token_weight <= 0)."""
    bs = resolve_block_sizes(block_sizes, interpret)
    geo = _geometry(hidden, weight, targets, token_weight, bs)
    c = _compact(hidden, targets, token_weight, geo)
    lse_c = _fwd_call(c, _padded_weight(weight, geo), geo, bs, interpret)
    # The target logit is one row-wise dot per token: cheaper here than a [bv, bt] select-and-sum
    # pass per grid step in the kernel.
    w_t = jnp.take(weight, c.targets[0], axis=0, mode="clip")
    tgt_c = jnp.sum(c.hidden.astype(_F32) * w_t.astype(_F32), axis=1)
    # Blocks past the count were never written (garbage/NaN there): select, never multiply.
    per_row = jnp.where(c.live, c.weights[0] * (lse_c[0] - tgt_c), 0.0)
    active = token_weight > 0
    lse = jnp.where(active, jnp.take(lse_c[0], c.dest), 0.0)
    return jnp.sum(per_row), lse


def cross_entropy_bwd(hidden, weight, targets, token_weight, lse, g, *,
                      block_sizes: BlockSizes | None = None, interpret):
    """Returns (d_hidden [N, H] in hidden's dtype, d_weight [V, H] in weight's dtype) for upstream
    gradient g (scalar) of loss_sum, from the lse saved by cross_entropy_fwd."""
    bs = resolve_block_sizes(block_sizes, interpret)
    geo = _geometry(hidden, weight, targets, token_weight, bs)
    if lse.shape != (geo.n,):
        raise ValueError(f"pallas_cross_entropy: lse {lse.shape} must be [N] = ({geo.n},)")
    c = _compact(hidden, targets, token_weight, geo)
    src_lse = jnp.zeros((geo.n_pad,), _F32).at[c.dest].set(lse.astype(_F32))
    lse_c = jnp.where(c.live, src_lse, 0.0).reshape(1, geo.n_pad)
    coef_c = c.weights * jnp.asarray(g, _F32)
    dh_c, dw = _bwd_call(c, _padded_weight(weight, geo), lse_c, coef_c, geo, bs, interpret)
    active = token_weight > 0
    # Blocks past the count were never written: select, never multiply.
    d_hidden = jnp.where(active[:, None], jnp.take(dh_c, c.dest, axis=0), 0.0).astype(hidden.dtype)
    if geo.v_pad != geo.v:
        dw = dw[:geo.v]
    return d_hidden, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def cross_entropy(hidden, weight, targets, token_weight, block_sizes=None, interpret=True):
    """loss_sum with gradients for hidden and weight (plain-JAX convenience over the pair)."""
    return cross_entropy_fwd(hidden, weight, targets, token_weight, block_sizes=block_sizes,
                             interpret=interpret)[0]


def _ce_vjp_fwd(hidden, weight, targets, token_weight, block_sizes, interpret):
    loss, lse = cross_entropy_fwd(hidden, weight, targets, token_weight, block_sizes=block_sizes,
                                  interpret=interpret)
    return loss, (hidden, weight, targets, token_weight, lse)


def _ce_vjp_bwd(block_sizes, interpret, res, g):
    hidden, weight, targets, token_weight, lse = res
    dh, dw = cross_entropy_bwd(hidden, weight, targets, token_weight, lse, g,
                               block_sizes=block_sizes, interpret=interpret)
    return dh, dw, None, jnp.zeros_like(token_weight)


cross_entropy.defvjp(_ce_vjp_fwd, _ce_vjp_bwd)


def computed_blocks(hidden, weight, targets, token_weight, *, block_sizes: BlockSizes | None = None,
                    interpret) -> dict:
    """Debug: run both kernels with counters of the grid steps whose matmuls actually ran and of
    the token rows that went through them (summed over steps). Returns {"fwd", "bwd", "fwd_rows",
    "bwd_rows"} (int32 scalars) and the static sizes {"grid_fwd", "grid_bwd", "token_blocks"}:
    with the skipping working, fwd = live_token_blocks * vocab_blocks."""
    bs = resolve_block_sizes(block_sizes, interpret)
    geo = _geometry(hidden, weight, targets, token_weight, bs)
    c = _compact(hidden, targets, token_weight, geo)
    w = _padded_weight(weight, geo)
    lse_c, n_fwd = _fwd_call(c, w, geo, bs, interpret, count_blocks=True)
    lse_c = jnp.where(c.live[None, :], lse_c, 0.0)
    _, _, n_bwd = _bwd_call(c, w, lse_c, c.weights, geo, bs, interpret, count_blocks=True)
    return {
        "fwd": n_fwd[0], "bwd": n_bwd[0], "fwd_rows": n_fwd[1], "bwd_rows": n_bwd[1],
        "grid_fwd": geo.nt * geo.vocab(bs.block_vocab)[1],
        "grid_bwd": geo.nt * geo.vocab(bs.block_vocab_bwd)[1],
        "token_blocks": geo.nt,
    }


# The binding (kernels/binding.py) finds these through the registry: `interpret` runs the kernels
# with Pallas' interpreter (CPU, inside the torch_xla graph), `mosaic` compiles them for TPU.
from kernels import register_backend  # noqa: E402  (torch-free registry)

register_backend("cross_entropy", "interpret", cross_entropy_fwd, cross_entropy_bwd, static={"interpret": True})
register_backend("cross_entropy", "mosaic", cross_entropy_fwd, cross_entropy_bwd, static={"interpret": False})
