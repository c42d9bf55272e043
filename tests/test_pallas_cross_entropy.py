"""Pallas fused masked cross-entropy (kernels/pallas_cross_entropy.py) in plain JAX.

Checked against the pure-jnp reference (kernels/reference.py): loss and both gradients in Pallas'
interpret mode, under TPU interpret mode (DMA / semaphore / VMEM semantics simulated), lowered
for TPU with jax.export (Mosaic custom calls), the run-time skipping of token blocks (and row
pieces) past the loss-position count, and, with the `tpu` marker, compiled by Mosaic on a TPU.
"""

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax import export as jax_export  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402

from conftest import jax_on_tpu  # noqa: E402
from kernels import pallas_cross_entropy as pce  # noqa: E402
from kernels import reference as ref  # noqa: E402

# Small blocks so that tiny shapes still span several token and vocab blocks; 384 does not divide
# the padded vocab of 1000 (1024), so the backward also exercises the overlapping last W slab.
SMALL = pce.BlockSizes(block_tokens=128, block_vocab=256, block_vocab_bwd=384)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# Jitted once at module level: tests sharing shapes reuse the compiled program (compiling the
# interpreted kernels is most of the cost here; the loss count is data, not shape).
_STATIC = ("block_sizes", "interpret")
FWD = jax.jit(pce.cross_entropy_fwd, static_argnames=_STATIC)
BWD = jax.jit(pce.cross_entropy_bwd, static_argnames=_STATIC)
REF_FWD = jax.jit(ref.cross_entropy_reference_fwd)
REF_BWD = jax.jit(ref.cross_entropy_reference_bwd)
COUNT = jax.jit(pce.computed_blocks, static_argnames=_STATIC)


def _inputs(n, h, v, n_loss, dtype, *, seed=0, mixed_weights=False, scale=0.3):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    hidden = jax.random.normal(keys[0], (n, h), jnp.float32).astype(dtype)
    weight = (jax.random.normal(keys[1], (v, h), jnp.float32) * scale).astype(dtype)
    targets = jax.random.randint(keys[2], (n,), 0, v, jnp.int32)
    rows = np.asarray(jax.random.permutation(keys[3], n))[:n_loss]
    w = np.zeros((n,), np.float32)
    if mixed_weights:
        w[rows] = np.asarray(jax.random.uniform(keys[4], (n_loss,), minval=0.05, maxval=20.0))
        # Non-positive weights are not loss positions, whatever their magnitude.
        others = np.setdiff1d(np.arange(n), rows)[:5]
        w[others] = -3.0
    else:
        w[rows] = 1.0
    return hidden, weight, targets, jnp.asarray(w)


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    assert np.all(np.isfinite(a)), "non-finite values in the kernel's output"
    scale = max(float(np.max(np.abs(b))), 1e-30)
    return float(np.max(np.abs(a - b))) / scale


def _check_against_reference(hidden, weight, targets, tw, *, block_sizes, interpret=True, g=1.7,
                             fwd=FWD, bwd=BWD):
    tol = TOL[hidden.dtype.type]
    loss, lse = fwd(hidden, weight, targets, tw, block_sizes=block_sizes, interpret=interpret)
    r_loss, r_lse = REF_FWD(hidden, weight, targets, tw)
    dh, dw = bwd(hidden, weight, targets, tw, lse, g, block_sizes=block_sizes, interpret=interpret)
    r_dh, r_dw = REF_BWD(hidden, weight, targets, tw, r_lse, g)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert dh.dtype == hidden.dtype and dh.shape == hidden.shape
    assert dw.dtype == weight.dtype and dw.shape == weight.shape
    active = np.asarray(tw > 0)
    if not active.any():
        assert float(loss) == 0.0
        assert not np.any(np.asarray(dh, np.float32)) and not np.any(np.asarray(dw, np.float32))
        return
    assert abs(float(loss) - float(r_loss)) <= tol * abs(float(r_loss)), (loss, r_loss)
    assert _rel(lse[active], r_lse[active]) <= tol
    assert _rel(dh, r_dh) <= tol
    assert _rel(dw, r_dw) <= tol
    # Non-loss rows get exactly zero gradient.
    assert not np.any(np.asarray(dh, np.float32)[~active])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n_loss", [0, 1, 60, 300], ids=["none", "one", "20pct", "all"])
def test_parity_vocab_1000(n_loss, dtype):
    # N=300 is not a multiple of the token block, V=1000 not a multiple of any vocab block.
    _check_against_reference(*_inputs(300, 64, 1000, n_loss, dtype), block_sizes=SMALL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_parity_mixed_token_weights(dtype):
    _check_against_reference(*_inputs(300, 64, 1000, 90, dtype, seed=3, mixed_weights=True),
                             block_sizes=SMALL, g=0.37)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_parity_qwen_vocab(dtype):
    # V=151936 = 1187 * 128: no power-of-two block divides it, so the last slab overlaps.
    bs = pce.BlockSizes(block_tokens=128, block_vocab=16384, block_vocab_bwd=32768)
    _check_against_reference(*_inputs(24, 16, 151936, 5, dtype, seed=1), block_sizes=bs)


def test_parity_default_block_sizes():
    # block_sizes=None: the interpreter's defaults (one token block, vocab smaller than a block).
    _check_against_reference(*_inputs(40, 32, 1000, 17, jnp.float32, seed=2), block_sizes=None)


def test_garbage_on_non_loss_rows_does_not_leak():
    hidden, weight, targets, tw = _inputs(300, 64, 1000, 30, jnp.float32, seed=4)
    inactive = ~(tw > 0)
    hidden = jnp.where(inactive[:, None], jnp.nan, hidden).at[jnp.argmax(inactive)].set(jnp.inf)
    targets = jnp.where(inactive, -7, targets)  # out-of-range targets only where nothing is learned
    loss, lse = FWD(hidden, weight, targets, tw, block_sizes=SMALL, interpret=True)
    dh, dw = BWD(hidden, weight, targets, tw, lse, 1.0, block_sizes=SMALL, interpret=True)
    r_loss, _ = REF_FWD(hidden, weight, jnp.maximum(targets, 0), tw)
    assert abs(float(loss) - float(r_loss)) <= 1e-5 * abs(float(r_loss))
    assert np.all(np.isfinite(np.asarray(dh))) and np.all(np.isfinite(np.asarray(dw)))
    assert not np.any(np.asarray(dh)[np.asarray(inactive)])


def test_tied_embedding_gradient():
    """The same matrix as embedding and LM head, differentiated under jit through the custom_vjp
    over the fwd/bwd pair: its d_weight plus the embedding's scatter-add gradient must equal
    autodiff through the reference."""
    n, h, v = 96, 32, 1000
    hidden0, weight, targets, tw = _inputs(n, h, v, 40, jnp.float32, seed=5, mixed_weights=True)
    ids = jax.random.randint(jax.random.PRNGKey(9), (n,), 0, v, jnp.int32)
    mix = jax.random.normal(jax.random.PRNGKey(10), (h, h), jnp.float32) / np.sqrt(h)
    fused = functools.partial(pce.cross_entropy, block_sizes=SMALL, interpret=True)

    def model(weight, loss_fn, tie=True):
        emb = weight if tie else jax.lax.stop_gradient(weight)
        x = jnp.tanh(emb[ids] @ mix) + 0.1 * hidden0  # embedding lookup through the same weight
        return loss_fn(x, weight, targets, tw)

    loss, grad = jax.jit(jax.value_and_grad(lambda w: model(w, fused)))(weight)
    r_loss, r_grad = jax.jit(jax.value_and_grad(
        lambda w: model(w, ref.cross_entropy_reference)))(weight)
    assert abs(float(loss) - float(r_loss)) <= 1e-5 * abs(float(r_loss))
    assert _rel(grad, r_grad) <= 1e-5
    # Both uses really contribute: the head-only gradient differs from the tied one.
    head_only = jax.jit(jax.grad(
        lambda w: model(w, ref.cross_entropy_reference, tie=False)))(weight)
    assert _rel(head_only, r_grad) > 1e-3


# ---- skipping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_loss", [0, 1, 128, 129, 700, 1024])
def test_blocks_computed_follow_loss_count(n_loss):
    """Token blocks past cdiv(count, block_tokens) run no matmul, in either kernel."""
    hidden, weight, targets, tw = _inputs(1024, 16, 1000, n_loss, jnp.float32, seed=7)
    counts = COUNT(hidden, weight, targets, tw, block_sizes=SMALL, interpret=True)
    live = -(-n_loss // 128)
    assert counts["token_blocks"] == 8
    assert int(counts["fwd"]) == live * 4  # ceil(1024 / 256) vocab blocks
    assert int(counts["bwd"]) == live * 3  # ceil(1024 / 384)
    assert int(counts["fwd_rows"]) == live * 128 * 4
    assert counts["grid_fwd"] == 32 and counts["grid_bwd"] == 24


PIECES = pce.BlockSizes(block_tokens=512, block_vocab=256, block_vocab_bwd=384)


@pytest.mark.parametrize("n_loss,rows", [(700, 512 + 256), (1000, 512 + 512), (897, 512 + 512),
                                         (513, 512 + 256), (5, 256)])
def test_partial_block_computes_only_live_pieces(n_loss, rows):
    """Within the last live token block only the 128-row-granular pieces holding live rows run
    (512-row blocks: pieces of 256, 128, 128), and the result is still exact."""
    inputs = _inputs(1024, 16, 1000, n_loss, jnp.float32, seed=12)
    counts = COUNT(*inputs, block_sizes=PIECES, interpret=True)
    assert int(counts["fwd_rows"]) == rows * 4
    assert int(counts["bwd_rows"]) == rows * 3
    assert pce.computed_rows(1024, n_loss, PIECES) == rows
    _check_against_reference(*inputs, block_sizes=PIECES)


# ---- TPU semantics without a TPU -----------------------------------------------------------------


@pytest.mark.parametrize("n,n_loss,h,dtype,pieces", [
    (200, 0, 16, jnp.float32, False), (200, 1, 16, jnp.float32, False),
    (400, 300, 16, jnp.float32, False), (200, 200, 16, jnp.bfloat16, False),
    (1024, 700, 16, jnp.float32, True), (300, 260, 1024, jnp.float32, False),
    (300, 260, 1024, jnp.bfloat16, False)],
    ids=["none", "one", "multi-block", "all-bf16", "partial-pieces", "H-chunks-f32", "H-chunks-bf16"])
def test_tpu_interpret_mode(n, n_loss, h, dtype, pieces):
    """Simulated TPU: DMAs complete only when waited on, fresh buffers are NaN, races are detected.
    Catches a missing wait, a block read before its copy or a write-back that is never issued, on
    both d_hidden paths (one live token block in VMEM; several, read-modify-written in HBM), and on
    both d_weight write-backs (fp32 W straight from the accumulator, bf16 W through a cast copy),
    with H contracted in 512-lane chunks (H = 1024) as on a TPU."""
    assert (pce._h_chunk(h, False) < h) == (h > 512)
    params = pltpu.InterpretParams(dma_execution_mode="on_wait", detect_races=True,
                                   uninitialized_memory="nan")
    from jax._src.pallas.mosaic import interpret as tpu_interpret

    with pltpu.force_tpu_interpret_mode(params):
        # Fresh jits: the interpret mode is picked up while tracing.
        fwd = jax.jit(pce.cross_entropy_fwd, static_argnames=_STATIC)
        bwd = jax.jit(pce.cross_entropy_bwd, static_argnames=_STATIC)
        _check_against_reference(*_inputs(n, h, 1000, n_loss, dtype, seed=8),
                                 block_sizes=PIECES if pieces else SMALL, interpret=False,
                                 fwd=fwd, bwd=bwd)
    assert tpu_interpret.races is None or not tpu_interpret.races.races_found


def test_tpu_interpret_mode_single_weight_buffer():
    """The backward's fallback for small VMEM (one W slab, fetched when its vocab block starts),
    as chosen for a chip whose VMEM holds one slab but not two: exact, race-free, NaN-safe."""
    from kernels import tpu as ktpu

    n, h, v, dtype = 400, 1024, 1000, jnp.float32
    bs = pce.BlockSizes(block_tokens=128, block_vocab=256, block_vocab_bwd=512)
    one = pce.vmem_estimate("bwd", 128, 512, h, dtype, dtype, w_buffers=1)
    two = pce.vmem_estimate("bwd", 128, 512, h, dtype, dtype, w_buffers=2)
    limit = (one + two) // 2  # holds one slab, not two
    small = ktpu.TpuChip("small", "small test chip", _vmem_for_limit(limit), 1, 1.0, 1.0)
    assert small.kernel_vmem_limit >= one and small.kernel_vmem_limit < two
    assert pce.bwd_weight_buffers(128, 512, h, dtype, dtype, small) == 1
    params = pltpu.InterpretParams(dma_execution_mode="on_wait", detect_races=True,
                                   uninitialized_memory="nan")
    from jax._src.pallas.mosaic import interpret as tpu_interpret

    with pltpu.force_tpu_interpret_mode(params):
        static = ("block_sizes", "interpret", "chip")
        fwd = jax.jit(pce.cross_entropy_fwd, static_argnames=static)
        bwd = jax.jit(pce.cross_entropy_bwd, static_argnames=static)
        _check_against_reference(*_inputs(n, h, v, 300, dtype, seed=9), block_sizes=bs,
                                 interpret=False, fwd=functools.partial(fwd, chip=small),
                                 bwd=functools.partial(bwd, chip=small))
    assert tpu_interpret.races is None or not tpu_interpret.races.races_found


def _vmem_for_limit(limit):
    """The VMEM size whose kernel_vmem_limit (capacity less max(capacity / 16, 1 MiB)) is limit."""
    from kernels import tpu as ktpu

    vmem = limit + ktpu.MiB
    while ktpu.TpuChip("x", "x", vmem, 1, 1.0, 1.0).kernel_vmem_limit < limit:
        vmem += 4096
    return vmem


# ---- lowering for TPU ----------------------------------------------------------------------------


def _export_text(fn, *args):
    exported = jax_export.export(jax.jit(fn), platforms=["tpu"])(*args)
    return exported.mlir_module()


def test_lowers_to_mosaic_for_tpu():
    """bf16 at the Qwen3-1.7B head size with the tiles chosen for v5e: every kernel must lower
    to a Mosaic tpu_custom_call (block shapes, layouts, DMA and semaphore use all checked by the
    Pallas TPU lowering). Lowering only; nothing runs (tests/test_tpu_compile.py compiles them)."""
    n, h, v = 8192, 2048, 151936
    sds = jax.ShapeDtypeStruct
    args = (sds((n, h), jnp.bfloat16), sds((v, h), jnp.bfloat16), sds((n,), jnp.int32),
            sds((n,), jnp.float32))
    fwd = functools.partial(pce.cross_entropy_fwd, interpret=False, chip="v5e")
    text = _export_text(fwd, *args)
    assert text.count("tpu_custom_call") == 1
    assert "masked_ce_fwd" in text
    bwd = functools.partial(pce.cross_entropy_bwd, interpret=False, chip="v5e")
    text = _export_text(bwd, *args, sds((n,), jnp.float32), sds((), jnp.float32))
    assert text.count("tpu_custom_call") == 1
    assert "masked_ce_bwd" in text


def test_lowers_fp32_and_odd_vocab_for_tpu():
    sds = jax.ShapeDtypeStruct
    args = (sds((1000, 256), jnp.float32), sds((1000, 256), jnp.float32), sds((1000,), jnp.int32),
            sds((1000,), jnp.float32))
    bwd = functools.partial(pce.cross_entropy_bwd, block_sizes=None, interpret=False)
    text = _export_text(bwd, *args, sds((1000,), jnp.float32), sds((), jnp.float32))
    assert text.count("tpu_custom_call") == 1


# ---- validation ----------------------------------------------------------------------------------


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="block_vocab"):
        pce.BlockSizes(block_vocab=100)
    with pytest.raises(TypeError, match="BlockSizes"):
        pce.cross_entropy_fwd(*_inputs(8, 8, 200, 2, jnp.float32), block_sizes=(128, 128, 128),
                              interpret=True)


def test_shape_errors_name_the_argument():
    hidden, weight, targets, tw = _inputs(8, 8, 200, 2, jnp.float32)
    with pytest.raises(ValueError, match="weight"):
        pce.cross_entropy_fwd(hidden, weight[:, :4], targets, tw, interpret=True)
    with pytest.raises(ValueError, match="targets"):
        pce.cross_entropy_fwd(hidden, weight, targets[:4], tw, interpret=True)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        pce.cross_entropy_fwd(hidden.astype(jnp.float16), weight, targets, tw, interpret=True)


# ---- real TPU ------------------------------------------------------------------------------------


@pytest.mark.tpu
@pytest.mark.skipif(not jax_on_tpu(), reason="needs a TPU: the Mosaic-compiled kernels only run there")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n_loss", [0, 1, 410, 2048], ids=["none", "one", "20pct", "all"])
def test_mosaic_on_tpu(n_loss, dtype):
    fwd = jax.jit(pce.cross_entropy_fwd, static_argnames=("block_sizes", "interpret"))
    bwd = jax.jit(pce.cross_entropy_bwd, static_argnames=("block_sizes", "interpret"))
    _check_against_reference(*_inputs(2048, 256, 151936, n_loss, dtype, seed=11, scale=0.05),
                             block_sizes=None, interpret=False, fwd=fwd, bwd=bwd)


def test_interpreter_tiles_follow_the_row_count():
    """In Pallas' interpreter (CPU) a call of at most INTERPRET_SMALL_ROWS rows gets 256-row token blocks
    (a train step's few hundred loss rows then fill one block, not half of a 512-row one); larger calls
    512; tiles given by the caller are kept whatever the size."""
    small = pce.resolve_block_sizes(None, True, rows=pce.INTERPRET_SMALL_ROWS)
    large = pce.resolve_block_sizes(None, True, rows=pce.INTERPRET_SMALL_ROWS + 1)
    assert (small.block_tokens, large.block_tokens) == (256, 512)
    assert small.block_vocab == large.block_vocab == 2048
    assert pce.resolve_block_sizes({"block_tokens": 128}, True, rows=64).block_tokens == 128
