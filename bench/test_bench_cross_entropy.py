"""Masked cross-entropy over the LM head: our fused Pallas kernel against the dense reference and
the naive path.

Through the torch binding on the XLA device, forward and forward+backward, fp32, one case per
process (time and peak memory). Full: N=4096 tokens, H=512, V=151936 (Qwen3's vocabulary), 20%
loss positions with 1/t-style weights (SFT: only masked response tokens are scored).

* pallas: kernels/pallas_cross_entropy.py: loss rows compacted to the front, logits only for them,
  block by block (never [N, V]); the backward recomputes each logit block (4 matmuls per live
  block against the naive path's 3 over every row).
* reference: kernels/reference.py, pure jnp through call_jax: dense [N, V] logits.
* naive: kernels/naive.py, the seed's design: full [N, V] logits upcast to fp32, CE at every
  position, then masked; gradients by torch autograd.

Working set = peak RSS during the timed rounds - resident memory once inputs, parameters and the
previous round's gradients exist (bench/harness.py).

    pytest bench/test_bench_cross_entropy.py --benchmark-only [--fast]
"""

from __future__ import annotations

import os

import pytest

from bench import harness

FULL = dict(N=4096, H=512, V=151936, fraction=0.2)
if os.environ.get("BENCH_CE_SHAPE"):  # e.g. BENCH_CE_SHAPE=4096,1024,151936 (Qwen3-0.6B's hidden)
    FULL.update(zip("NHV", map(int, os.environ["BENCH_CE_SHAPE"].split(","))))
FAST = dict(N=2048, H=128, V=16384, fraction=0.2)
ROUNDS = {"full": 3, "fast": 3}

CASES = [(impl, mode) for mode in ("fwd_bwd", "fwd") for impl in ("pallas", "naive", "reference")]
FAST_CASES = {("pallas", "fwd_bwd"), ("naive", "fwd_bwd")}


def _name(impl, mode):
    return f"ce-{impl}-{mode}"


def _params():
    for case in CASES:
        marks = [pytest.mark.fast] if case in FAST_CASES else []
        yield pytest.param(*case, id=_name(*case).removeprefix("ce-"), marks=marks)


@pytest.mark.parametrize(("impl", "mode"), list(_params()))
def test_cross_entropy(benchmark, record_figure, impl, mode):
    shape = FAST if harness.is_fast() else FULL
    # The first round compiles and warms up; the naive round at full size takes minutes.
    spec = dict(builder="bench.cases:cross_entropy", impl=impl, mode=mode, warmup=0, **shape)
    res = harness.measure(benchmark, _name(impl, mode), spec, rounds=ROUNDS[harness.size()],
                          group=f"cross_entropy {mode}")
    assert res["compiles_during_rounds"] == 0, "the case recompiled between rounds"
    # Same inputs, same math: every backend's loss agrees with the others (fp32, any order).
    losses = {k: v["first_facts"]["loss"] for k, v in harness.CASES.items()
              if k.startswith("ce-") and "loss" in v.get("first_facts", {})}
    ref = res["first_facts"]["loss"]
    for other, loss in losses.items():
        assert abs(loss - ref) <= 1e-4 * abs(ref), f"{_name(impl, mode)} loss {ref} vs {other} {loss}"
    record_figure.many(_figures())


def _figures():
    figs = harness.FigureList()
    add, n = figs.add, _name

    add("ce_speedup_vs_naive", harness.ratio(n("naive", "fwd_bwd"), n("pallas", "fwd_bwd")), "x",
        "fwd+bwd time, naive (full fp32 logits, then masked) / fused")
    add("ce_speedup_vs_naive_wall",
        harness.ratio(n("naive", "fwd_bwd"), n("pallas", "fwd_bwd"), "wall"), "x",
        "the same in wall-clock time (shared machine: noisy)")
    add("ce_peak_mem_ratio_naive_over_fused",
        harness.ratio(n("naive", "fwd_bwd"), n("pallas", "fwd_bwd"), "working_set_bytes"), "x",
        "fwd+bwd working set (peak RSS - baseline), naive / fused")
    add("ce_process_peak_ratio_naive_over_fused",
        harness.ratio(n("naive", "fwd_bwd"), n("pallas", "fwd_bwd"), "peak_rss_bytes"), "x",
        "whole-process peak RSS, naive / fused (includes inputs, weights, runtime)")
    add("ce_speedup_vs_reference", harness.ratio(n("reference", "fwd_bwd"), n("pallas", "fwd_bwd")),
        "x", "fwd+bwd time, dense jnp reference / fused")
    add("ce_fwd_speedup_vs_naive", harness.ratio(n("naive", "fwd"), n("pallas", "fwd")), "x",
        "forward-only time, naive / fused")
    add("ce_fwd_peak_mem_ratio_naive_over_fused",
        harness.ratio(n("naive", "fwd"), n("pallas", "fwd"), "working_set_bytes"), "x",
        "forward-only working set, naive / fused")
    fused = harness.CASES.get(n("pallas", "fwd_bwd"))
    if fused and "gflop_per_s" in fused:
        add("ce_fused_gflop_per_s", fused["gflop_per_s"], "GFLOP/s",
            f"matmul FLOPs the fused kernel ran ({fused['computed_rows']} of {fused['shape']['N']} "
            f"rows) / time")
    naive = harness.CASES.get(n("naive", "fwd_bwd"))
    if naive and "gflop_per_s" in naive:
        add("ce_naive_gflop_per_s", naive["gflop_per_s"], "GFLOP/s", "naive matmul FLOPs / time")
    return figs
