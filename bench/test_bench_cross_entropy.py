"""Fused masked cross-entropy (Pallas, interpret mode on CPU) vs the naive LM-head loss.

Forward + backward at N=4096 tokens, H=1024, V=151936 (Qwen3 vocabulary), 20% loss positions, fp32:

* naive: the seed's design - full [N, V] fp32 logits, log-softmax CE at every position, then masked;
  gradients by JAX autodiff.
* fused: kernels/pallas_cross_entropy.py, cross_entropy_fwd then cross_entropy_bwd (interpret=True,
  the interpreter's default block sizes unless CE_BENCH_BLOCKS="tokens,vocab,vocab_dw").

Each case runs in a fresh subprocess that builds its inputs, compiles, records its resident memory
(the baseline: inputs, compiled program, runtime), resets the peak counter, and then serves timed
rounds over a pipe; pytest-benchmark times the rounds (the pipe adds microseconds to seconds-long
rounds). Working set = peak RSS (getrusage, after the reset) - baseline - bytes of the outputs (the
gradient buffers every implementation must return): what the op needs beyond its inputs and outputs.
Figures go to bench/results/cross_entropy.json. Targets: >= 3x faster, >= 10x smaller working set.

    pytest bench/test_bench_cross_entropy.py --benchmark-only
Env: CE_BENCH_ROUNDS (default 3), CE_BENCH_SHAPE="N,H,V" (default 4096,1024,151936),
CE_BENCH_FRACTION (0.2), CE_BENCH_BLOCKS (fused block sizes).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cross_entropy.json"
ROUNDS = int(os.environ.get("CE_BENCH_ROUNDS", "3"))
SHAPE = tuple(int(x) for x in os.environ.get("CE_BENCH_SHAPE", "4096,1024,151936").split(","))
FRACTION = float(os.environ.get("CE_BENCH_FRACTION", "0.2"))
BLOCKS = os.environ.get("CE_BENCH_BLOCKS", "")
TARGET_SPEEDUP = 3.0
TARGET_MEMORY = 10.0

_results: dict[str, dict] = {}


# --------------------------------------------------------------------------------------------------
# child process (python bench/test_bench_cross_entropy.py --child CASE)
# --------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cpu_seconds() -> float:
    """CPU time of this process (all threads): the work done, whatever else shares the cores."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _child(case: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels import pallas_cross_entropy as pce

    n, h, v = SHAPE
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(keys[0], (n, h), jnp.float32)
    weight = jax.random.normal(keys[1], (v, h), jnp.float32) * 0.02
    targets = jax.random.randint(keys[2], (n,), 0, v, jnp.int32)
    n_loss = int(round(FRACTION * n))
    rows = np.asarray(jax.random.permutation(keys[3], n))[:n_loss]
    tw = np.zeros((n,), np.float32)
    tw[rows] = np.linspace(1.0, 20.0, n_loss)  # 1/t-style weights
    token_weight = jnp.asarray(tw)
    args = (hidden, weight, targets, token_weight)

    if case == "naive":
        def loss_fn(hidden, weight, targets, token_weight):
            logits = jnp.dot(hidden, weight.T, preferred_element_type=jnp.float32)
            ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
                logits, targets[:, None], axis=-1)[:, 0]
            return jnp.sum(jnp.where(token_weight > 0, token_weight * ce, 0.0))

        step = jax.value_and_grad(loss_fn, argnums=(0, 1))
        block_sizes = None
    else:
        block_sizes = (pce.BlockSizes(*map(int, BLOCKS.split(","))) if BLOCKS
                       else pce.resolve_block_sizes(None, True))

        def step(hidden, weight, targets, token_weight):
            loss, lse = pce.cross_entropy_fwd(hidden, weight, targets, token_weight,
                                              block_sizes=block_sizes, interpret=True)
            d_hidden, d_weight = pce.cross_entropy_bwd(hidden, weight, targets, token_weight, lse,
                                                       1.0, block_sizes=block_sizes, interpret=True)
            return loss, (d_hidden, d_weight)

    compiled = jax.jit(step).lower(*args).compile()
    jax.block_until_ready(args)
    out_bytes = 4 + hidden.nbytes + weight.nbytes
    baseline = _rss_bytes()
    try:  # reset the peak-RSS counter so compilation does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    loss, grads = jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t0
    peak = _peak_bytes()
    del grads
    if block_sizes is None:
        flops = 3 * 2 * n * h * v
    else:
        rows = pce.computed_rows(n, n_loss, block_sizes)
        flops = 4 * 2 * rows * h * v  # forward 1 matmul; backward 3 (logits again, dW, dh)
    info = {
        "case": case, "shape": {"N": n, "H": h, "V": v}, "loss_positions": n_loss,
        "loss": float(loss), "block_sizes": None if block_sizes is None else vars(block_sizes),
        "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "output_bytes": out_bytes,
        "working_set_bytes": peak - baseline - out_bytes, "peak_counter_reset": reset,
        "first_run_s": first, "matmul_flops": flops,
    }
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        c0, t0 = _cpu_seconds(), time.perf_counter()
        jax.block_until_ready(compiled(*args))
        print(f"DONE {time.perf_counter() - t0} {_cpu_seconds() - c0}", flush=True)


# --------------------------------------------------------------------------------------------------
# parent (pytest-benchmark)
# --------------------------------------------------------------------------------------------------


class _Child:
    def __init__(self, case: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("JAX_PLATFORMS", "cpu")
        self.proc = subprocess.Popen(
            [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", case],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self._expect("READY"))
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def _expect(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return line[len(tag) + 1:]
        raise RuntimeError(f"benchmark child exited with {self.proc.wait()} before {tag}")

    def run(self) -> None:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        wall, cpu = self._expect("DONE").split()
        self.times.append(float(wall))
        self.cpu_times.append(float(cpu))

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def _measure(benchmark, case: str) -> dict:
    child = _Child(case)
    try:
        benchmark.pedantic(child.run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    finally:
        child.close()
    info = dict(child.info)
    info["round_s"] = child.times
    info["median_s"] = statistics.median(child.times)
    info["round_cpu_s"] = child.cpu_times
    info["median_cpu_s"] = statistics.median(child.cpu_times)
    info["gflops_per_s"] = info["matmul_flops"] / info["median_s"] / 1e9
    benchmark.extra_info.update({k: info[k] for k in (
        "median_s", "peak_rss_bytes", "working_set_bytes", "gflops_per_s", "loss_positions")})
    _results[case] = info
    return info


def _write_report() -> dict:
    report = {
        "benchmark": "masked cross-entropy forward+backward, fp32, CPU (Pallas interpret mode)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0]},
        "rounds": ROUNDS,
        "cases": _results,
    }
    if "naive" in _results and "fused" in _results:
        naive, fused = _results["naive"], _results["fused"]
        speedup = naive["median_s"] / fused["median_s"]
        memory = naive["working_set_bytes"] / max(fused["working_set_bytes"], 1)
        report["ratios"] = {
            "speedup": speedup,
            "cpu_time_ratio": naive["median_cpu_s"] / fused["median_cpu_s"],
            "working_set_reduction": memory,
            "peak_rss_reduction": naive["peak_rss_bytes"] / fused["peak_rss_bytes"],
            "targets": {"speedup": TARGET_SPEEDUP, "working_set_reduction": TARGET_MEMORY},
            "meets_speedup_target": speedup >= TARGET_SPEEDUP,
            "meets_memory_target": memory >= TARGET_MEMORY,
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    return report


@pytest.mark.benchmark(group="cross_entropy")
def test_cross_entropy_naive(benchmark):
    info = _measure(benchmark, "naive")
    assert info["loss"] > 0
    _write_report()


@pytest.mark.benchmark(group="cross_entropy")
def test_cross_entropy_fused(benchmark):
    info = _measure(benchmark, "fused")
    assert info["loss"] > 0
    report = _write_report()
    if "ratios" in report:
        naive = _results["naive"]
        # Same inputs, same math: the two losses agree (fp32, different summation orders).
        assert abs(info["loss"] - naive["loss"]) <= 1e-4 * abs(naive["loss"])
        r = report["ratios"]
        print(f"\nfused vs naive: {r['speedup']:.2f}x faster, working set "
              f"{r['working_set_reduction']:.1f}x smaller "
              f"({info['working_set_bytes'] / 2**20:.0f} MiB vs "
              f"{naive['working_set_bytes'] / 2**20:.0f} MiB)")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    _child(sys.argv[2])
