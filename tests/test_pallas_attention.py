"""Pallas masked attention kernels in plain JAX on CPU (no torch).

Held against `kernels.reference` (the dense pure-jnp semantics) three ways: the generic Pallas
interpreter (interpret=True, the CPU backend), the TPU interpreter
(`force_tpu_interpret_mode`: TPU block semantics, NaN-filled uninitialised memory, out-of-bounds
checks) and Mosaic lowering (`jax.export(..., platforms=["tpu"])` must produce tpu_custom_calls).
Work skipping is checked on the kernel itself, not only on its schedule table. On a TPU host the
`tpu` tests run the same parity compiled by Mosaic.
"""

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.export  # noqa: E402,F401  (jax.export is not imported by `import jax` in 0.7)
import jax.numpy as jnp  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402

from conftest import jax_on_tpu  # noqa: E402
from kernels import pallas_attention as pa  # noqa: E402
from kernels import reference as ref  # noqa: E402


def _segments(l, rows):
    """rows: per batch row, the lengths of its packed segments; the rest of the row is padding."""
    seg = np.zeros((len(rows), l), np.int32)
    for r, lengths in enumerate(rows):
        assert sum(lengths) <= l
        pos = 0
        for sid, n in enumerate(lengths, start=1):
            seg[r, pos:pos + n] = sid
            pos += n
    return jnp.asarray(seg)


def _inputs(b, hq, hkv, l, d, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (b, hq, l, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, hkv, l, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, hkv, l, d), jnp.float32)
    do = jax.random.normal(keys[3], (b, hq, l, d), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v, do))


def _err(got, want, dtype):
    """fp32: max absolute error. bf16: max absolute error relative to the reference's max."""
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert np.isfinite(got).all(), "kernel produced NaN/inf"
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    if dtype == jnp.bfloat16:
        err /= max(float(np.max(np.abs(want))), 1e-6)
    return err


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@functools.partial(jax.jit, static_argnames=("causal",))
def _reference(q, k, v, do, seg, *, causal):
    o, lse = ref.attention_reference_fwd(q, k, v, seg, causal=causal, sm_scale=None)
    return (o, lse, *ref.attention_reference_bwd(q, k, v, seg, o, lse, do, causal=causal,
                                                 sm_scale=None))


def _check_parity(b, hq, hkv, l, d, rows, causal, dtype, block_sizes, *, interpret=True,
                  seed=0):
    q, k, v, do = _inputs(b, hq, hkv, l, d, dtype, seed)
    seg = _segments(l, rows)
    static = dict(causal=causal, sm_scale=None)
    o, lse = pa.attention_fwd(q, k, v, seg, block_sizes=block_sizes, interpret=interpret,
                              **static)
    dq, dk, dv = pa.attention_bwd(q, k, v, seg, o, lse, do, block_sizes=block_sizes,
                                  interpret=interpret, **static)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == (b, hq, l) and lse.dtype == jnp.float32
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert (dq.dtype, dk.dtype, dv.dtype) == (q.dtype, k.dtype, v.dtype)

    # Ground truth in fp32 from the same (possibly bf16-rounded) inputs.
    ro, rlse, rdq, rdk, rdv = _reference(*(x.astype(jnp.float32) for x in (q, k, v, do)), seg,
                                         causal=causal)
    tol = TOL[dtype]
    errs = {name: _err(got, want, dtype) for name, got, want in
            (("o", o, ro), ("lse", lse, rlse), ("dq", dq, rdq), ("dk", dk, rdk),
             ("dv", dv, rdv))}
    assert all(e <= tol for e in errs.values()), f"errors {errs} over tolerance {tol}"

    # Padding (segment 0): exactly zero output, lse and gradients, as queries and as keys.
    pad = np.asarray(seg) == 0
    for name, x in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
        x = np.asarray(x, np.float32)
        assert np.all(x[np.broadcast_to(pad[:, None, :, None], x.shape)] == 0), name
    assert np.all(np.asarray(lse)[np.broadcast_to(pad[:, None, :], lse.shape)] == 0)


# (B, Hq, Hkv, L, D, segments per row, causal, dtype, block sizes). Between them: GQA 1/2/8,
# one and several packed segments, trailing padding, a fully padded row, one-token segments,
# causal and bidirectional, L not a multiple of the blocks, head_dim 64 and 128, fp32 and bf16,
# separate backward block sizes, the defaults, and blocks inside one segment (unmasked path).
PARITY_CASES = {
    "mha-packed-pad-bidir": (2, 2, 2, 256, 64, [[100, 60, 96], [37, 1, 1, 80]], False,
                             jnp.float32, (64, 64)),
    "gqa2-onetoken-emptyrow-causal-L200-d128": (2, 4, 2, 200, 128, [[1, 1, 1, 120, 50], []],
                                                True, jnp.float32, (64, 32)),
    "gqa8-bwd-blocks-causal-L160": (2, 8, 1, 160, 64, [[160], [20] * 6 + [40]], True,
                                    jnp.float32,
                                    pa.BlockSizes(32, 32, block_q_dq=32, block_k_dq=64,
                                                  block_q_dkv=64, block_k_dkv=32)),
    "bf16-gqa2-causal-d128": (2, 4, 2, 256, 128, [[256], [70, 1, 120]], True, jnp.bfloat16,
                              (128, 64)),
    "bf16-gqa8-default-blocks-L130": (1, 8, 1, 130, 64, [[60, 70]], False, jnp.bfloat16, None),
}


@pytest.mark.parametrize("case", list(PARITY_CASES), ids=str)
def test_parity_interpret(case):
    _check_parity(*PARITY_CASES[case])


# --------------------------------------------------------------------------------------------------
# TPU semantics, emulated on CPU
# --------------------------------------------------------------------------------------------------


TPU_INTERPRET_CASES = {
    # Mosaic-legal blocks (multiples of 128); interpret=False selects the TPU operand layout, and
    # the context manager runs it in the TPU interpreter instead of compiling it.
    "gqa2-causal-pad-d128": (1, 4, 2, 256, 128, [[100, 1, 130]], True, jnp.float32,
                             (128, 128)),
    "bf16-gqa4-emptyrow-d64": (2, 4, 1, 256, 64, [[256], []], False, jnp.bfloat16, (128, 128)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TPU_INTERPRET_CASES), ids=str)
def test_parity_tpu_interpret_mode(case):
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(detect_races=True)):
        _check_parity(*TPU_INTERPRET_CASES[case], interpret=False)
    from jax._src.pallas.mosaic import interpret as tpu_interpret
    assert not tpu_interpret.races.races_found


# --------------------------------------------------------------------------------------------------
# Mosaic lowering (runs on CPU: no TPU needed to lower, only to compile)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype,d", [(jnp.bfloat16, 128), (jnp.float32, 64)], ids=["bf16", "f32"])
def test_lowers_to_mosaic(causal, dtype, d):
    b, hq, hkv, l = 2, 16, 8, 2048
    q = jax.ShapeDtypeStruct((b, hq, l, d), dtype)
    kv = jax.ShapeDtypeStruct((b, hkv, l, d), dtype)
    seg = jax.ShapeDtypeStruct((b, l), jnp.int32)
    lse = jax.ShapeDtypeStruct((b, hq, l), jnp.float32)
    static = dict(causal=causal, sm_scale=None, interpret=False)
    fwd = jax.export.export(jax.jit(functools.partial(pa.attention_fwd, **static)),
                            platforms=["tpu"])(q, kv, kv, seg)
    bwd = jax.export.export(jax.jit(functools.partial(pa.attention_bwd, **static)),
                            platforms=["tpu"])(q, kv, kv, seg, q, lse, q)
    assert fwd.mlir_module().count("tpu_custom_call") == 1
    assert bwd.mlir_module().count("tpu_custom_call") == 2  # dq kernel + dk/dv kernel
    assert fwd.out_avals[0].shape == (b, hq, l, d) and fwd.out_avals[1].shape == (b, hq, l)


def test_mosaic_rejects_unaligned_blocks():
    q = jnp.zeros((1, 1, 256, 64), jnp.float32)
    seg = jnp.ones((1, 256), jnp.int32)
    with pytest.raises(ValueError, match="multiples of 128"):
        pa.attention_fwd(q, q, q, seg, causal=False, sm_scale=None, block_sizes=(64, 128),
                         interpret=False)


def test_block_sizes_config():
    assert pa.BlockSizes.from_config(None) == pa.DEFAULT_BLOCK_SIZES
    cfg = pa.BlockSizes.from_config({"block_q": 256, "block_k": 128, "block_q_dkv": 512})
    assert (cfg.fwd, cfg.dq, cfg.dkv) == ((256, 128), (256, 128), (512, 128))
    assert pa.BlockSizes.from_config((128, 256)) == pa.BlockSizes(128, 256)
    assert hash(cfg) == hash(pa.BlockSizes(256, 128, block_q_dkv=512))  # static-arg safe
    with pytest.raises(ValueError, match="unknown keys"):
        pa.BlockSizes.from_config({"block_q": 128, "blok_k": 128})
    with pytest.raises(ValueError, match="positive int"):
        pa.BlockSizes(0, 128)
    # Defaults fit TPU tiles and shrink (aligned) for short sequences instead of padding to 512.
    assert all(x % 128 == 0 for x in pa.DEFAULT_BLOCK_SIZES.fwd + pa.DEFAULT_BLOCK_SIZES.dkv)
    assert pa._plan(None, 200, interpret=False).padded_len == 256


def test_shape_errors_name_the_argument():
    q = jnp.zeros((1, 3, 16, 8), jnp.float32)
    kv = jnp.zeros((1, 2, 16, 8), jnp.float32)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        pa.attention_fwd(q, kv, kv, jnp.ones((1, 16), jnp.int32), causal=False, sm_scale=None,
                         interpret=True)
    with pytest.raises(ValueError, match="segment_ids"):
        pa.attention_fwd(q[:, :2], kv, kv, jnp.ones((1, 15), jnp.int32), causal=False,
                         sm_scale=None, interpret=True)


# --------------------------------------------------------------------------------------------------
# work skipping
# --------------------------------------------------------------------------------------------------


def _equal_segments(b, l, n):
    return _segments(l, [[l // n] * n] * b)


def test_schedule_skips_packed_and_causal_pairs():
    l, blk = 1024, 128
    one, total = pa.count_computed_blocks(_equal_segments(2, l, 1), causal=False, block_q=blk,
                                          block_k=blk)
    four, _ = pa.count_computed_blocks(_equal_segments(2, l, 4), causal=False, block_q=blk,
                                       block_k=blk)
    causal, _ = pa.count_computed_blocks(_equal_segments(2, l, 1), causal=True, block_q=blk,
                                         block_k=blk)
    assert one == total == 2 * (l // blk) ** 2
    assert four * 4 == one  # 4 segments of 2 blocks each: 4 * 2 * 2 of the 8 * 8 pairs
    assert 0.5 <= causal / one <= 0.6  # lower triangle with the diagonal: 36 of 64
    # Padding blocks are never computed, not even against each other.
    half_pad, _ = pa.count_computed_blocks(_segments(l, [[l // 2]]), causal=False, block_q=blk,
                                           block_k=blk)
    assert half_pad * 4 == (l // blk) ** 2
    # Unequal q/k blocks: a 128-row query block inside a 256-token segment meets 2 key blocks of 128
    # or 1 of 256.
    rect, _ = pa.count_computed_blocks(_equal_segments(1, l, 4), causal=False, block_q=128,
                                       block_k=256)
    assert rect == 8


def _dense_pair_mask(seg, causal, bq, bk):
    """Which block pairs contain at least one allowed (query, key) pair, from the dense mask."""
    s = np.asarray(seg)
    allowed = (s[:, :, None] == s[:, None, :]) & (s[:, :, None] != 0)
    if causal:
        allowed &= np.tril(np.ones((s.shape[1],) * 2, bool))[None]
    b, l, _ = allowed.shape
    return allowed.reshape(b, l // bq, bq, l // bk, bk).any(axis=(2, 4))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_kernel_runs_exactly_the_needed_blocks(causal):
    """The forward kernel's own record of which grid steps computed: exactly the pairs that hold an
    allowed (query, key) pair for packed rows, so no work is wasted and none is missed."""
    b, hq, hkv, l, d, blk = 2, 2, 1, 256, 32, 32
    seg = _segments(l, [[64] * 4, [100, 60, 50]])  # row 2: unaligned segments, trailing padding
    q, k, v, _ = _inputs(b, hq, hkv, l, d, jnp.float32)
    visits = np.asarray(pa.attention_fwd_block_visits(q, k, v, seg, causal=causal,
                                                      block_sizes=(blk, blk)))
    needed = _dense_pair_mask(seg, causal, blk, blk)
    sched = np.asarray(pa.block_schedule(seg, causal=causal, block_q=blk, block_k=blk))
    for h in range(hq):
        np.testing.assert_array_equal(visits[:, h].astype(bool), needed)
    np.testing.assert_array_equal(sched, needed)
    # Row 1 (4 aligned segments of 2 blocks): a quarter of the bidirectional pairs.
    if not causal:
        assert visits[0].sum() * 4 == hq * (l // blk) ** 2


def _kv_fetches(seg, causal, bq, bk):
    """Copies of K blocks the TPU pipeline issues in the forward grid: one per change of the
    block index along the grid order (b, [h,] i, j) (here for one head)."""
    b, l = seg.shape
    nq, nk = l // bq, l // bk
    t = pa._tables(seg, bq, bk, causal, inner="k")
    first, last = (np.asarray(x).reshape(b, nq) for x in (t.first, t.last))
    j = np.arange(nk)
    idx = np.clip(j[None, None, :], first[..., None], last[..., None]).reshape(b, -1)
    return int((np.diff(idx, axis=1) != 0).sum() + b)


def test_skipped_steps_issue_no_copies():
    l, blk = 1024, 128
    one = _kv_fetches(_equal_segments(2, l, 1), False, blk, blk)
    four = _kv_fetches(_equal_segments(2, l, 4), False, blk, blk)
    causal = _kv_fetches(_equal_segments(2, l, 1), True, blk, blk)
    computed_four, _ = pa.count_computed_blocks(_equal_segments(2, l, 4), causal=False,
                                                block_q=blk, block_k=blk)
    assert one == 2 * (l // blk) ** 2  # dense: every step loads a new block
    assert four <= computed_four  # packed: only computed steps may fetch
    assert four * 4 <= one * 1.05
    assert causal <= 0.6 * one


def test_flop_count_follows_skipping():
    l = 1024
    dense = pa.attention_matmul_flops(_equal_segments(1, l, 1), 4, 128, causal=False,
                                      block_sizes=(128, 128))
    packed = pa.attention_matmul_flops(_equal_segments(1, l, 4), 4, 128, causal=False,
                                       block_sizes=(128, 128))
    # forward 2 + dq 3 + dk/dv 4 matmuls of 2*L*L*D each per head when dense
    assert dense == 4 * 9 * 2 * l * l * 128
    assert packed * 4 == dense


# --------------------------------------------------------------------------------------------------
# real TPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.tpu
@pytest.mark.skipif(not jax_on_tpu(), reason="needs a TPU: jax.devices()[0].platform is not 'tpu'")
@pytest.mark.parametrize("case", list(TPU_INTERPRET_CASES) + ["default-blocks-L1000"], ids=str)
def test_parity_mosaic(case):
    args = TPU_INTERPRET_CASES.get(case) or (
        2, 16, 8, 1000, 128, [[300, 1, 400], [1000]], True, jnp.bfloat16, None)
    _check_parity(*args, interpret=False)
