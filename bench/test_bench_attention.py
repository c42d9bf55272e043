"""Masked attention: our Pallas kernel against the dense reference and the naive path.

Through the torch binding on the XLA device, as the model calls it, forward and forward+backward,
one case per process (time and peak memory):

* pallas: kernels/pallas_attention.py (Pallas' interpreter on CPU, Mosaic on TPU); GQA without
  repeating K/V; blocks whose segments cannot meet are skipped.
* reference: kernels/reference.py, dense pure jnp through call_jax.
* naive: kernels/naive.py, the seed's design: K/V repeated to every query head, dense [B, H, L, L]
  fp32 scores plus an additive mask, torch ops traced by torch_xla.

Each at 1 and 4 equal packed segments per row. With 4 segments, block size = segment length, a
row's (query block, key block) pairs that can interact are 4 of 16, so the kernel's time should
fall towards 1/4 (`attn_4seg_over_1seg_time`) while the dense paths' stays put.

    pytest bench/test_bench_attention.py --benchmark-only [--fast]
"""

from __future__ import annotations

import pytest

from bench import harness

FULL = dict(B=1, Hq=4, Hkv=2, L=1024, D=128, block_sizes={"block_q": 256, "block_k": 256})
FAST = dict(B=1, Hq=4, Hkv=2, L=1024, D=64, block_sizes={"block_q": 256, "block_k": 256})
ROUNDS = {"full": 7, "fast": 7}
GROUP = "attention"

# (impl, segments, mode); the fast subset runs the pair behind attn_4seg_over_1seg_time
CASES = [(impl, seg, mode) for mode in ("fwd_bwd", "fwd") for impl in ("pallas", "reference", "naive")
         for seg in (1, 4)]
FAST_CASES = {("pallas", 1, "fwd_bwd"), ("pallas", 4, "fwd_bwd")}


def _name(impl, seg, mode):
    return f"attention-{impl}-{seg}seg-{mode}"


def _params():
    for case in CASES:
        marks = [pytest.mark.fast] if case in FAST_CASES else []
        yield pytest.param(*case, id=_name(*case).removeprefix("attention-"), marks=marks)


@pytest.mark.parametrize(("impl", "segments", "mode"), list(_params()))
def test_attention(benchmark, record_figure, impl, segments, mode):
    shape = FAST if harness.is_fast() else FULL
    spec = dict(builder="bench.cases:attention", impl=impl, segments=segments, mode=mode,
                warmup=1, **shape)
    res = harness.measure(benchmark, _name(impl, segments, mode), spec,
                          rounds=ROUNDS[harness.size()], group=f"{GROUP} {mode}")
    assert res["compiles_during_rounds"] == 0, "the case recompiled between rounds"
    record_figure.many(_figures())


# bd3lm's attention (issue 20): a row of L / 2 tokens as its noised and clean copies (L in all), blocks of
# 8 tokens, against every pair computed (one plain segment of L) and the dense reference with the same mask.
BD_CASES = [("pallas", "bd8"), ("pallas", "all"), ("reference", "bd8")]
BD_FAST = {("pallas", "bd8"), ("pallas", "all")}


def _bd_name(impl, pattern):
    return f"attention-{impl}-{pattern}-fwd_bwd"


@pytest.mark.parametrize(("impl", "pattern"), [
    pytest.param(*case, id=_bd_name(*case).removeprefix("attention-"),
                 marks=[pytest.mark.fast] if case in BD_FAST else []) for case in BD_CASES])
def test_block_diffusion_attention(benchmark, record_figure, impl, pattern):
    shape = dict(FAST if harness.is_fast() else FULL)
    shape["block_sizes"] = {"block_q": 128, "block_k": 128}
    spec = dict(builder="bench.cases:attention", impl=impl, segments=1, mode="fwd_bwd", warmup=1,
                block_diffusion=8 if pattern == "bd8" else 0, **shape)
    res = harness.measure(benchmark, _bd_name(impl, pattern), spec, rounds=ROUNDS[harness.size()],
                          group=f"{GROUP} block diffusion")
    assert res["compiles_during_rounds"] == 0, "the case recompiled between rounds"
    record_figure.many(_figures())


def _figures():
    """Every figure whose cases have run in this session (recorded again as more cases finish)."""
    figs = harness.FigureList()
    add, n = figs.add, _name

    add("attn_4seg_over_1seg_time",
        harness.ratio(n("pallas", 4, "fwd_bwd"), n("pallas", 1, "fwd_bwd")), "x",
        "pallas fwd+bwd time, 4 packed segments / 1 (skipped blocks; ideal 0.25)")
    add("attn_4seg_over_1seg_wall_time",
        harness.ratio(n("pallas", 4, "fwd_bwd"), n("pallas", 1, "fwd_bwd"), "wall"), "x",
        "the same in wall-clock time (shared machine: noisy)")
    add("attn_fwd_4seg_over_1seg_time",
        harness.ratio(n("pallas", 4, "fwd"), n("pallas", 1, "fwd")), "x",
        "pallas forward time, 4 segments / 1")
    add("attn_reference_4seg_over_1seg_time",
        harness.ratio(n("reference", 4, "fwd_bwd"), n("reference", 1, "fwd_bwd")), "x",
        "dense reference fwd+bwd, 4 segments / 1 (no skipping: ~1)")
    for seg in (1, 4):
        add(f"attn_speedup_vs_naive_{seg}seg",
            harness.ratio(n("naive", seg, "fwd_bwd"), n("pallas", seg, "fwd_bwd")), "x",
            f"naive fwd+bwd time / pallas, {seg} segment(s)")
        add(f"attn_speedup_vs_reference_{seg}seg",
            harness.ratio(n("reference", seg, "fwd_bwd"), n("pallas", seg, "fwd_bwd")), "x",
            f"reference fwd+bwd time / pallas, {seg} segment(s)")
    add("attn_bd8_over_all_pairs_time",
        harness.ratio(_bd_name("pallas", "bd8"), _bd_name("pallas", "all")), "x",
        "pallas fwd+bwd, bd3lm pattern (blocks of 8) / every pair computed, same length (pairs run: 28 of 64)")
    add("attn_bd8_speedup_vs_dense_reference",
        harness.ratio(_bd_name("reference", "bd8"), _bd_name("pallas", "bd8")), "x",
        "dense jnp reference with the bd3lm mask / pallas, fwd+bwd")
    add("attn_peak_mem_ratio_naive_over_pallas",
        harness.ratio(n("naive", 1, "fwd_bwd"), n("pallas", 1, "fwd_bwd"), "working_set_bytes"),
        "x", "fwd+bwd working set (peak RSS - baseline), naive / pallas, 1 segment")
    return figs
