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
* On TPU: every matmul contracts H in 512-lane chunks (Mosaic's temporaries stay chunk-sized at any
  hidden size), and the tiles are chosen per chip from a VMEM estimate (`tiles_for`, `vmem_estimate`;
  kernels/tpu.py has each generation's VMEM): 512 x 512 wherever they fit, down to 128 x 128 with
  one W slab on v4 at hidden 4096. Tiles given that cannot fit are refused in one line.

Public API (module-level, the kernels contract's backend convention):
    cross_entropy_fwd(hidden, weight, targets, token_weight, *, block_sizes=None, interpret, chip=None)
        -> (loss_sum, lse)
    cross_entropy_bwd(hidden, weight, targets, token_weight, lse, g, *, block_sizes=None, interpret,
                      chip=None) -> (d_hidden, d_weight)
    tiles_for(chip, h, hidden_dtype, weight_dtype), vmem_estimate(...)   the TPU tile choice
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

from kernels import tpu as ktpu

# Mosaic kernels are serialised for the libtpu the project pins, whatever JAX's default backend is.
ktpu.pin_mosaic_ir_version()

_F32 = jnp.float32
_LANES = 128  # TPU lane width: vocab is padded / blocked in multiples of it
_NT_DIMS = (((1,), (1,)), ((), ()))  # a[m,k] . b[n,k] -> [m,n]
_TN_DIMS = (((0,), (0,)), ((), ()))  # a[k,m] . b[k,n] -> [m,n]
_NN_DIMS = (((1,), (0,)), ((), ()))  # a[m,k] . b[k,n] -> [m,n]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. block_tokens: compacted loss rows per block in the forward (also the granularity
    of the skipping); block_tokens_bwd: in the backward (None = block_tokens); block_vocab: vocab
    rows per block in the forward; block_vocab_bwd: in the backward. All must be multiples of 128
    (TPU lanes; per-token vectors are lane-dense rows). Shapes smaller than a block use one block of
    the (padded) full size instead. On TPU, fields left out are chosen for the chip (`tiles_for`)."""

    block_tokens: int = 512
    block_vocab: int = 512
    block_vocab_bwd: int = 512
    block_tokens_bwd: int | None = None

    def __post_init__(self):
        for name in _FIELDS:
            value = getattr(self, name)
            if name == "block_tokens_bwd" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % _LANES:
                raise ValueError(
                    f"BlockSizes.{name} must be a positive multiple of {_LANES}, got {value!r}")

    @property
    def tokens_bwd(self) -> int:
        return self.block_tokens_bwd or self.block_tokens


_FIELDS = ("block_tokens", "block_vocab", "block_vocab_bwd", "block_tokens_bwd")

# For the CPU interpreter: each grid step is one XLA while-loop iteration with its own copies, so
# large vocab blocks win. Measured fwd+bwd at N=4096, H=1024, V=151936, 819 loss rows (2 cores, CPU
# seconds): tokens/vocab 1024/2048 ~31, 1024/4096 ~31-36, 1024/1024 ~35-38, 256/2048 ~43,
# 128/2048 ~60 (small token blocks re-stream W per block and run small matmuls). 512 token rows:
# a train step has a few hundred loss rows, and a 1024-row block computed twice the rows it needed
# (the qwen3-tiny step's loss at ~450 loss rows: 3.6 s at 1024, 2.7-2.9 s at 384-512). Up to 2,048 rows
# 256-row blocks: the whole qwen3-tiny step (Qwen3 vocabulary, one core) at 4 x 128 took 0.45 s with 256,
# 0.69 s with 512 (one block of 512 rows for ~200 loss rows), 0.45 s with 128; at 16 x 128 1.07, 1.03-1.10
# and 1.16 s.
INTERPRET_BLOCK_SIZES = BlockSizes(block_tokens=512, block_vocab=2048, block_vocab_bwd=2048)
INTERPRET_SMALL_BLOCK_SIZES = BlockSizes(block_tokens=256, block_vocab=2048, block_vocab_bwd=2048)
INTERPRET_SMALL_ROWS = 2048
# On TPU the tiles are chosen per chip and hidden size (`tiles_for`): the first pair of each ladder
# whose VMEM estimate fits the chip. Larger token blocks re-read W fewer times (the forward streams
# all of W once per live token block), larger vocab blocks re-read the d_hidden partial sums fewer
# times (the backward reads and writes them once per vocab block).
_FWD_LADDER = ((512, 512), (512, 256), (256, 256), (256, 128), (128, 128))  # (tokens, vocab)
_BWD_LADDER = ((512, 512), (256, 512), (256, 256), (128, 256), (128, 128))
DEFAULT_BLOCK_SIZES = BlockSizes()  # what the ladders start from (and pick wherever VMEM allows)


def _h_chunk(h: int, interpret) -> int:
    """Lanes of H contracted per matmul. On TPU the logits and gradient matmuls run over H in chunks
    so that Mosaic's temporaries (operand relayouts, the fp32 passes of HIGHEST precision) stay
    [block, chunk]-sized at any hidden size; the interpreter gains nothing from splitting."""
    if interpret:
        return h
    for chunk in (512, 256, 128):
        if h > chunk and h % chunk == 0:
            return chunk
    return h


def vmem_estimate(which: str, bt: int, bv: int, h: int, hidden_dtype, weight_dtype,
                  w_buffers: int = 2) -> int:
    """Bytes of VMEM the forward ("fwd") or backward ("bwd") kernel uses at these tiles: its
    double-buffered blocks and scratch plus the [bv, bt] and per-chunk temporaries of its matmuls
    (an upper bound of Mosaic's own allocation, checked by tests/test_tpu_compile.py). w_buffers:
    VMEM slots for W slabs (the backward drops to one where two cannot fit)."""
    hsz, wsz = jnp.dtype(hidden_dtype).itemsize, jnp.dtype(weight_dtype).itemsize
    ck = _h_chunk(h, False)
    streams = 2 * bt * h * hsz + w_buffers * bv * h * wsz  # hidden and W blocks
    row = 8 * bt * 4  # one [1, bt] fp32 row block (8 sublanes)
    chunk_temps = 2 * (bv + bt) * ck * 4
    if which == "fwd":
        return streams + 4 * row + 4 * bv * bt * 4 + chunk_temps
    dw = bv * h * 4 + (bv * h * wsz if wsz != 4 else 0)  # fp32 accumulator (+ cast copy)
    dh = 2 * bt * h * 4  # fp32 d_hidden partial sums, double-buffered
    return streams + dw + dh + 6 * row + 6 * bv * bt * 4 + chunk_temps


def _fits(which, bt, bv, h, hidden_dtype, weight_dtype, chip) -> bool:
    """Whether these tiles fit the chip, with the backward's W slab single-buffered if need be."""
    need = vmem_estimate(which, bt, bv, h, hidden_dtype, weight_dtype, _w_buffers_min(which))
    return need <= chip.kernel_vmem_budget


def _w_buffers_min(which):
    return 1 if which == "bwd" else 2


def bwd_weight_buffers(bt, bv, h, hidden_dtype, weight_dtype, chip) -> int:
    """W slabs the backward keeps in VMEM: two (the next vocab block is fetched while this one
    computes) wherever they fit, else one (fetched at the first step of each vocab block, a stall of
    one slab's DMA per vocab block: the fallback that lets hidden 4096 in fp32 fit v4's 16 MiB)."""
    if chip is None:  # interpret mode
        return 2
    two = vmem_estimate("bwd", bt, bv, h, hidden_dtype, weight_dtype, 2)
    return 2 if two <= ktpu.get_chip(chip).kernel_vmem_budget else 1


def tiles_for(chip, h: int, hidden_dtype, weight_dtype) -> BlockSizes:
    """The default tiles on TPU `chip` (kernels.tpu.get_chip) at hidden size h: the first rung of
    each ladder that fits its VMEM."""
    chip = ktpu.get_chip(chip)
    chosen = {}
    for which, ladder in (("fwd", _FWD_LADDER), ("bwd", _BWD_LADDER)):
        fit = [p for p in ladder if _fits(which, *p, h, hidden_dtype, weight_dtype, chip)]
        if not fit:
            raise ktpu.vmem_error(
                f"the cross-entropy {'backward' if which == 'bwd' else 'forward'} at hidden size {h} "
                f"({jnp.dtype(hidden_dtype).name}) with its smallest tiles (128 x 128)", "model.loss_kernel_config",
                vmem_estimate(which, 128, 128, h, hidden_dtype, weight_dtype, _w_buffers_min(which)), chip,
                "no tile size fits this hidden size on this chip")
        chosen[which] = fit[0]
    (bt, bv), (bt_b, bv_b) = chosen["fwd"], chosen["bwd"]
    return BlockSizes(block_tokens=bt, block_vocab=bv, block_vocab_bwd=bv_b,
                      block_tokens_bwd=bt_b if bt_b != bt else None)


def resolve_block_sizes(block_sizes, interpret, *, chip=None, h=None, hidden_dtype=None,
                        weight_dtype=None, rows=None) -> BlockSizes:
    """The tiles a call runs with. Interpret mode: INTERPRET_BLOCK_SIZES (INTERPRET_SMALL_BLOCK_SIZES for
    `rows` up to INTERPRET_SMALL_ROWS) unless given. TPU: the
    chip's choice (`tiles_for`) with any fields the caller set (a BlockSizes or a mapping such as
    model.loss_kernel_config) put over it, refused in one line when they cannot fit the chip."""
    if block_sizes is not None and not isinstance(block_sizes, (BlockSizes, Mapping)):
        raise TypeError(f"block_sizes must be a BlockSizes or a mapping, got {type(block_sizes).__name__}")
    if isinstance(block_sizes, Mapping):  # model.loss_kernel_config arrives as a plain mapping
        unknown = sorted(set(block_sizes) - set(_FIELDS))
        if unknown:
            raise ValueError(f"cross-entropy block sizes: unknown keys {unknown}; known: {list(_FIELDS)}")
    if interpret:
        if block_sizes is None:
            small = rows is not None and rows <= INTERPRET_SMALL_ROWS
            return INTERPRET_SMALL_BLOCK_SIZES if small else INTERPRET_BLOCK_SIZES
        return block_sizes if isinstance(block_sizes, BlockSizes) else BlockSizes(**block_sizes)
    if h is None:  # no shapes (a caller that only wants the tiles' defaults)
        base = DEFAULT_BLOCK_SIZES
    else:
        base = tiles_for(chip, h, hidden_dtype, weight_dtype)
    if block_sizes is None:
        return base
    given = (dataclasses.asdict(block_sizes) if isinstance(block_sizes, BlockSizes)
             else {k: v for k, v in block_sizes.items() if v is not None})
    if "block_tokens" in given and given.get("block_tokens_bwd") is None:
        given["block_tokens_bwd"] = None  # as documented: the backward follows block_tokens
    bs = dataclasses.replace(base, **given)
    if h is not None:
        _check_fit(bs, given, chip, h, hidden_dtype, weight_dtype, base)
    return bs


def _check_fit(bs: BlockSizes, given: dict, chip, h, hidden_dtype, weight_dtype, base: BlockSizes):
    chip = ktpu.get_chip(chip)
    for which, bt, bv, keys in (("fwd", bs.block_tokens, bs.block_vocab, ("block_tokens", "block_vocab")),
                                ("bwd", bs.tokens_bwd, bs.block_vocab_bwd,
                                 ("block_tokens_bwd" if bs.block_tokens_bwd else "block_tokens",
                                  "block_vocab_bwd"))):
        if _fits(which, bt, bv, h, hidden_dtype, weight_dtype, chip):
            continue
        named = ", ".join(f"{k}={getattr(bs, k)}" for k in keys)
        suggest = ", ".join(f"{k}: {v}" for k, v in dataclasses.asdict(base).items() if v is not None)
        raise ktpu.vmem_error(
            f"the cross-entropy {'backward' if which == 'bwd' else 'forward'} with {named} at hidden "
            f"size {h} ({jnp.dtype(hidden_dtype).name})", "model.loss_kernel_config",
            vmem_estimate(which, bt, bv, h, hidden_dtype, weight_dtype, _w_buffers_min(which)), chip,
            f"leave the key out to get tiles that fit ({{{suggest}}})")


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


def _check_inputs(hidden, weight, targets, token_weight) -> None:
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


def _geometry(hidden, weight, block_tokens: int) -> _Geometry:
    n, h = hidden.shape
    v = weight.shape[0]
    # A single token block covering everything may be any multiple of 16 (bf16 sublane tile);
    # otherwise blocks are block_tokens rows (multiple of 128, so per-token rows stay lane-dense).
    bt = block_tokens if n > block_tokens else _round_up(n, 16)
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


def _over_chunks(h, ck, body, init=None):
    """body(cols, carry) over the H columns in chunks of ck lanes (cols a static slice when there is
    one chunk, else a pl.ds in a fori_loop, so only one chunk's temporaries are ever live)."""
    if ck >= h:
        return body(slice(None), init)
    return jax.lax.fori_loop(
        0, h // ck, lambda c, carry: body(pl.ds(pl.multiple_of(c * ck, ck), ck), carry), init)


def _logits_t(w_buf, w_slot, h_buf, h_slot, off, size, ck):
    """s^T = W_blk . h_blk^T, [bv, size] fp32, for rows [off, off + size) of the hidden block."""
    bv, h = w_buf.shape[1], w_buf.shape[2]
    return _over_chunks(h, ck, lambda cols, acc: (0.0 if acc is None else acc) + _dot(
        w_buf[w_slot, :, cols], h_buf[h_slot, off:off + size, cols], _NT_DIMS),
        None if ck >= h else jnp.zeros((bv, size), _F32))


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


def computed_rows(n: int, n_loss: int, block_sizes: BlockSizes, which: str = "fwd") -> int:
    """Token rows that go through the matmuls (per vocab block) for N=n rows of which n_loss are
    loss positions: whole live token blocks, then the live pieces of the last one. For FLOP
    accounting: the forward does 2 * rows * H * V_pad FLOPs, the backward ("bwd", at its own
    token block) 6 * rows * H * V_pad."""
    block = block_sizes.block_tokens if which == "fwd" else block_sizes.tokens_bwd
    bt = block if n > block else _round_up(n, 16)
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


def _fwd_kernel(count_ref, h_hbm, w_hbm, lse_ref, *rest, bt, bv, nv, v_pad, v, ck, count_blocks):
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
            s = _logits_t(w_buf, w_slot, h_buf, h_slot, off, size, ck)  # [bv, size]
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


def _dlogits(s, t_row, lse_row, coef_row, owned, rows):
    """d loss / d s^T for one [bv, size] logit block: coef * (softmax - onehot) on owned rows,
    else 0."""
    p = jnp.exp(s - lse_row)
    d = p - jnp.where(rows == t_row, 1.0, 0.0)
    return jnp.where(owned, d * coef_row, 0.0)


def _bwd_kernel(count_ref, t_ref, lse_ref, c_ref, h_hbm, w_hbm, dh_hbm, dw_hbm, *rest, bt, bv, nv,
                v_pad, v, tail, ck, w_buffers, count_blocks):
    """Grid (vocab block j, token block i), tokens inner. Per live step one recomputed [bv, bt]
    d_logits block feeds both gradients:
      d_weight slab j: fp32 VMEM accumulator over token blocks, written once per slab (cast into a
        copy first when W is not fp32);
      d_hidden block i: fp32, accumulated over vocab blocks. With one live token block it stays in
        VMEM; with more it is read-modified-written in HBM, double-buffered (the next step's block
        is prefetched while this one computes, each write is waited for one step later)."""
    if count_blocks:
        counter_ref, *rest = rest
    else:
        counter_ref = None
    h_buf, h_sems, w_buf, w_sems, dw_acc, dw_sem, dh_buf, dh_rsems, dh_wsems, *cast = rest
    dw_out = cast[0] if cast else dw_acc  # fp32 W: the accumulator is written back as it is
    j, i = pl.program_id(0), pl.program_id(1)
    live = _live_blocks(count_ref, bt)
    w_slot = j % 2 if w_buffers == 2 else 0
    w_copy = functools.partial(_w_slab_copy, w_hbm, w_buf, w_sems, bv=bv, v_pad=v_pad)
    h_copy = functools.partial(_h_block_copy, h_hbm, h_buf, h_sems, bt=bt)
    _count(counter_ref, (i == 0) & (j == 0))

    # d_weight slab j goes back to HBM asynchronously; the copy is waited for one vocab block later,
    # before its source buffer is written again.
    def dw_copy(rows_from, n_rows, hbm_start):
        return pltpu.make_async_copy(dw_out.at[pl.ds(rows_from, n_rows)],
                                     dw_hbm.at[pl.ds(hbm_start, n_rows)], dw_sem)

    # ---- W slab j: fetched at the first token step of each vocab block, j + 1 prefetched.
    @pl.when(i == 0)
    def _():
        if not cast:
            @pl.when(j > 0)
            def _():
                dw_copy(0, bv, 0).wait()  # slab j - 1 was written back from dw_acc

        dw_acc[...] = jnp.zeros(dw_acc.shape, _F32)

        @pl.when(live > 0)  # no loss rows: W is never read, the slabs written are zeros
        def _():
            if w_buffers == 2:
                _stream(w_copy, j, nv, j, j + 1)
            else:  # one slot: fetched when its vocab block starts
                w_copy(j, 0).start()
                w_copy(j, 0).wait()

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

        vrows, owned = _block_rows(j, bv=bv, v_pad=v_pad, v=v)
        h = h_buf.shape[-1]

        def rows(off, size):
            d = _dlogits(_logits_t(w_buf, w_slot, h_buf, h_slot, off, size, ck),
                         t_ref[:, off:off + size], lse_ref[:, off:off + size],
                         c_ref[:, off:off + size], owned, vrows)
            d_h, d_w = d.astype(h_buf.dtype), d.astype(w_buf.dtype)

            def grads(cols, carry):
                dw_acc[:, cols] += _dot(d_h, h_buf[h_slot, off:off + size, cols], _NN_DIMS)  # [bv, ck]
                dh_part = _dot(d_w, w_buf[w_slot, :, cols], _TN_DIMS)  # [size, ck]

                @pl.when(j == 0)
                def _():
                    dh_buf[slot, off:off + size, cols] = dh_part

                @pl.when(j > 0)
                def _():
                    dh_buf[slot, off:off + size, cols] += dh_part

                return carry

            _over_chunks(h, ck, grads, 0)
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
    @pl.when(i == jnp.maximum(live, 1) - 1)
    def _():
        if cast:
            @pl.when(j > 0)
            def _():
                dw_copy(0, bv, 0).wait()  # slab j - 1's copy out of dw_out

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


def _compiler_params(ndims, chip, interpret, estimate: int):
    # "arbitrary" everywhere: blocks are prefetched across grid steps, which needs sequential order.
    # The scoped VMEM limit follows the kernel's estimate (the tiles were chosen to fit, `tiles_for`).
    vmem = None if interpret else ktpu.get_chip(chip).declared_vmem(estimate)
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


def _double_buffers(bt: int, bv: int, h: int, hidden_dtype, weight_dtype, w_buffers: int = 2) -> list:
    """Scratch both kernels stream through: two VMEM slots (and their DMA semaphores) for a token
    block of hidden rows and w_buffers for a vocab block of weight rows, filled one step ahead."""
    return [pltpu.VMEM((2, bt, h), hidden_dtype), pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((w_buffers, bv, h), weight_dtype), pltpu.SemaphoreType.DMA((w_buffers,))]


def _fwd_call(c: _Compacted, w, geo: _Geometry, bs: BlockSizes, interpret, chip, count_blocks=False):
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
                          ck=_h_chunk(h, interpret), count_blocks=count_blocks),
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
        compiler_params=_compiler_params(2, chip, interpret,
                                         vmem_estimate("fwd", bt, bv, h, c.hidden.dtype, w.dtype)),
        # Upper bounds: the live fraction of the token blocks is only known at run time.
        cost_estimate=pl.CostEstimate(
            flops=2 * geo.n_pad * geo.v_pad * h, transcendentals=geo.n_pad * geo.v_pad,
            bytes_accessed=geo.nt * geo.v_pad * h * isz + geo.n_pad * h * hsz),
        interpret=interpret,
        name="masked_ce_fwd",
    )(c.count, c.hidden, w)
    return out if count_blocks else out[0]


def _bwd_call(c: _Compacted, w, lse_c, coef_c, geo: _Geometry, bs: BlockSizes, interpret, chip,
              count_blocks=False):
    bt, h = geo.bt, geo.h
    bv, nv, tail = geo.vocab(bs.block_vocab_bwd)
    isz, hsz = w.dtype.itemsize, c.hidden.dtype.itemsize
    w_buffers = bwd_weight_buffers(bt, bv, h, c.hidden.dtype, w.dtype, chip)
    out_specs = [_ANY_SPEC, _ANY_SPEC]
    out_shape = [jax.ShapeDtypeStruct((geo.n_pad, h), _F32),  # d_hidden, fp32 partial sums
                 jax.ShapeDtypeStruct((geo.v_pad, h), w.dtype)]
    if count_blocks:
        out_specs.append(_COUNTER_SPEC)
        out_shape.append(_COUNTER_SHAPE)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, bt=bt, bv=bv, nv=nv, v_pad=geo.v_pad, v=geo.v, tail=tail,
                          ck=_h_chunk(h, interpret), w_buffers=w_buffers, count_blocks=count_blocks),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(nv, geo.nt),
            in_specs=[_tok_row_spec(bt, 1), _tok_row_spec(bt, 1), _tok_row_spec(bt, 1),
                      _ANY_SPEC, _ANY_SPEC],
            out_specs=out_specs,
            scratch_shapes=[
                *_double_buffers(bt, bv, h, c.hidden.dtype, w.dtype, w_buffers),
                pltpu.VMEM((bv, h), _F32),  # d_weight accumulator
                pltpu.SemaphoreType.DMA(()),
                pltpu.VMEM((2, bt, h), _F32),  # d_hidden partial sums
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.SemaphoreType.DMA((2,)),
                # d_weight cast to W's dtype before its write-back (fp32 W: written as it is)
                *([pltpu.VMEM((bv, h), w.dtype)] if w.dtype != _F32 else []),
            ],
        ),
        out_shape=out_shape,
        compiler_params=_compiler_params(2, chip, interpret,
                                         vmem_estimate("bwd", bt, bv, h, c.hidden.dtype, w.dtype, w_buffers)),
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


def _prepare(hidden, weight, targets, token_weight, block_sizes, interpret, chip, which):
    """(tiles, geometry at that kernel's token block, chip) for one call."""
    _check_inputs(hidden, weight, targets, token_weight)
    chip = None if interpret else ktpu.resolve_chip(chip)
    bs = resolve_block_sizes(block_sizes, interpret, chip=chip, h=hidden.shape[1],
                             hidden_dtype=hidden.dtype, weight_dtype=weight.dtype, rows=hidden.shape[0])
    bt = bs.block_tokens if which == "fwd" else bs.tokens_bwd
    return bs, _geometry(hidden, weight, bt), chip


def cross_entropy_fwd(hidden, weight, targets, token_weight, *,
                      block_sizes: BlockSizes | None = None, interpret, chip=None):
    """Returns (loss_sum fp32 scalar, lse [N] fp32; 0 on rows with token_weight <= 0). `chip`: the
    TPU generation to size tiles for (kernels.tpu; default: the compile target or this device)."""
    bs, geo, chip = _prepare(hidden, weight, targets, token_weight, block_sizes, interpret, chip, "fwd")
    c = _compact(hidden, targets, token_weight, geo)
    lse_c = _fwd_call(c, _padded_weight(weight, geo), geo, bs, interpret, chip)
    # The target logit is one row-wise dot per token: cheaper here than a [bv, bt] select-and-sum
    # pass per grid step in the kernel.
    w_t = jnp.take(weight, c.targets[0], axis=0, mode="clip")
    tgt_c = jnp.sum(c.hidden.astype(_F32) * w_t.astype(_F32), axis=1)
    # Blocks past the count were never written (garbage/NaN there): select, never multiply.
    per_row = jnp.where(c.live, c.weights[0] * (lse_c[0] - tgt_c), 0.0)
    active = token_weight > 0
    lse = jnp.where(active, jnp.take(lse_c[0], c.dest), 0.0)
    return jnp.sum(per_row), lse


def _compacted_lse(lse, c: _Compacted, geo: _Geometry):
    src_lse = jnp.zeros((geo.n_pad,), _F32).at[c.dest].set(lse.astype(_F32))
    return jnp.where(c.live, src_lse, 0.0).reshape(1, geo.n_pad)


def cross_entropy_bwd(hidden, weight, targets, token_weight, lse, g, *,
                      block_sizes: BlockSizes | None = None, interpret, chip=None):
    """Returns (d_hidden [N, H] in hidden's dtype, d_weight [V, H] in weight's dtype) for upstream
    gradient g (scalar) of loss_sum, from the lse saved by cross_entropy_fwd."""
    bs, geo, chip = _prepare(hidden, weight, targets, token_weight, block_sizes, interpret, chip, "bwd")
    if lse.shape != (geo.n,):
        raise ValueError(f"pallas_cross_entropy: lse {lse.shape} must be [N] = ({geo.n},)")
    c = _compact(hidden, targets, token_weight, geo)
    coef_c = c.weights * jnp.asarray(g, _F32)
    dh_c, dw = _bwd_call(c, _padded_weight(weight, geo), _compacted_lse(lse, c, geo), coef_c, geo, bs,
                         interpret, chip)
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
                    interpret, chip=None) -> dict:
    """Debug: run both kernels with counters of the grid steps whose matmuls actually ran and of
    the token rows that went through them (summed over steps). Returns {"fwd", "bwd", "fwd_rows",
    "bwd_rows"} (int32 scalars) and the static sizes {"grid_fwd", "grid_bwd", "token_blocks"
    (forward), "token_blocks_bwd"}: with the skipping working, fwd = live_token_blocks * vocab_blocks."""
    bs, geo, chip = _prepare(hidden, weight, targets, token_weight, block_sizes, interpret, chip, "fwd")
    _, geo_b, _ = _prepare(hidden, weight, targets, token_weight, bs, interpret, chip, "bwd")
    c = _compact(hidden, targets, token_weight, geo)
    lse_c, n_fwd = _fwd_call(c, _padded_weight(weight, geo), geo, bs, interpret, chip, count_blocks=True)
    lse = jnp.where(token_weight > 0, jnp.take(lse_c[0], c.dest), 0.0)
    c_b = _compact(hidden, targets, token_weight, geo_b)
    _, _, n_bwd = _bwd_call(c_b, _padded_weight(weight, geo_b), _compacted_lse(lse, c_b, geo_b), c_b.weights,
                            geo_b, bs, interpret, chip, count_blocks=True)
    return {
        "fwd": n_fwd[0], "bwd": n_bwd[0], "fwd_rows": n_fwd[1], "bwd_rows": n_bwd[1],
        "grid_fwd": geo.nt * geo.vocab(bs.block_vocab)[1],
        "grid_bwd": geo_b.nt * geo_b.vocab(bs.block_vocab_bwd)[1],
        "token_blocks": geo.nt, "token_blocks_bwd": geo_b.nt,
    }


# The binding (kernels/binding.py) finds these through the registry: `interpret` runs the kernels
# with Pallas' interpreter (CPU, inside the torch_xla graph), `mosaic` compiles them for TPU.
from kernels import register_backend  # noqa: E402  (torch-free registry)

register_backend("cross_entropy", "interpret", cross_entropy_fwd, cross_entropy_bwd, static={"interpret": True})
register_backend("cross_entropy", "mosaic", cross_entropy_fwd, cross_entropy_bwd, static={"interpret": False})
