"""Masked attention on CPU, plain JAX: the Pallas kernels (interpret mode) against the dense
pure-jnp reference, and the effect of work skipping (4 equal packed segments per row vs 1).

Each case times one jitted forward + backward (the hand-written backward from the saved lse, as
the torch binding runs it). Figures go to bench/results/attention.json: medians, the matmul FLOPs
the kernels actually ran (skipped blocks excluded; the reference always does the dense 2 + 5
matmuls) and the ratios. Interpreted kernels on CPU are for correctness and the CPU path; the
point measured here is how time follows the skipped work, not absolute speed.

    pytest bench/test_bench_attention.py --benchmark-only
"""

import functools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from kernels import pallas_attention as pa  # noqa: E402
from kernels import reference as ref  # noqa: E402

B, HQ, HKV, L, D = 1, 4, 2, 1024, 128
DTYPE = jnp.float32  # bf16 matmuls are emulated on CPU; fp32 measures the schedule, not emulation
BLOCKS = pa.BlockSizes(256, 256)  # one block per 256-token segment: skipping is exact
ROUNDS = 5
RESULTS_PATH = Path(__file__).parent / "results" / "attention.json"

_results: dict = {}


def _segments(n_segments):
    ids = np.repeat(np.arange(1, n_segments + 1, dtype=np.int32), L // n_segments)
    return jnp.asarray(np.broadcast_to(ids, (B, L)))


def _inputs():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (B, HQ, L, D), DTYPE)
    k = jax.random.normal(keys[1], (B, HKV, L, D), DTYPE)
    v = jax.random.normal(keys[2], (B, HKV, L, D), DTYPE)
    do = jax.random.normal(keys[3], (B, HQ, L, D), DTYPE)
    return q, k, v, do


@functools.partial(jax.jit, static_argnames=("causal",))
def _kernel_fwd_bwd(q, k, v, seg, do, *, causal):
    static = dict(causal=causal, sm_scale=None, block_sizes=BLOCKS, interpret=True)
    o, lse = pa.attention_fwd(q, k, v, seg, **static)
    return pa.attention_bwd(q, k, v, seg, o, lse, do, **static)


@functools.partial(jax.jit, static_argnames=("causal",))
def _reference_fwd_bwd(q, k, v, seg, do, *, causal):
    o, lse = ref.attention_reference_fwd(q, k, v, seg, causal=causal, sm_scale=None)
    return ref.attention_reference_bwd(q, k, v, seg, o, lse, do, causal=causal, sm_scale=None)


def _write_results():
    res = _results
    ratios = {}

    def ratio(name, num, den):
        if num in res and den in res:
            ratios[name] = res[num]["median_s"] / res[den]["median_s"]

    ratio("kernel_4seg_over_1seg", "kernel-4seg", "kernel-1seg")
    ratio("kernel_causal_over_bidir", "kernel-1seg-causal", "kernel-1seg")
    ratio("reference_4seg_over_1seg", "reference-4seg", "reference-1seg")
    ratio("kernel_over_reference_1seg", "kernel-1seg", "reference-1seg")
    ratio("kernel_over_reference_4seg", "kernel-4seg", "reference-4seg")
    payload = {
        "what": "masked attention forward+backward, plain JAX on CPU; kernel = Pallas "
                "interpret=True, reference = dense jnp",
        "config": {"B": B, "Hq": HQ, "Hkv": HKV, "L": L, "D": D, "dtype": jnp.dtype(DTYPE).name,
                   "block_sizes": [BLOCKS.block_q, BLOCKS.block_k], "rounds": ROUNDS,
                   "jax": jax.__version__, "machine": platform.machine(),
                   "cpus": os.cpu_count()},
        "results": res,
        "ratios": ratios,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS_PATH.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(RESULTS_PATH)


CASES = {
    # name: (implementation, segments per row, causal)
    "reference-1seg": ("reference", 1, False),
    "reference-4seg": ("reference", 4, False),
    "kernel-1seg": ("kernel", 1, False),
    "kernel-4seg": ("kernel", 4, False),
    "kernel-1seg-causal": ("kernel", 1, True),
}


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_attention_fwd_bwd(benchmark, case):
    impl, n_seg, causal = CASES[case]
    q, k, v, do = _inputs()
    seg = _segments(n_seg)
    fn = _kernel_fwd_bwd if impl == "kernel" else _reference_fwd_bwd
    run = lambda: jax.block_until_ready(fn(q, k, v, seg, do, causal=causal))  # noqa: E731
    run()  # compile outside the timed rounds
    benchmark.group = "attention fwd+bwd"
    benchmark.extra_info.update(impl=impl, segments=n_seg, causal=causal)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    if impl == "kernel":
        flops = pa.attention_matmul_flops(seg, HQ, D, causal=causal, block_sizes=BLOCKS)
    else:  # dense: QK^T, PV forward; QK^T, dO V^T, dS K, dS^T Q, P^T dO backward
        flops = 7 * 2 * B * HQ * L * L * D
    stats = benchmark.stats.stats
    _results[case] = {
        "median_s": stats.median, "mean_s": stats.mean, "min_s": stats.min,
        "rounds": stats.rounds, "matmul_flops": flops,
        "gflop_per_s": flops / stats.median / 1e9,
    }
    benchmark.extra_info["matmul_flops"] = flops
    _write_results()
