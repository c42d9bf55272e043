"""The benchmark harness: cases in fresh processes, figures, floors and the summary.

Cases. A case is a spec (a JSON-able dict) whose "builder" names a function "module:function" that,
in a fresh process with the XLA device already created, builds its inputs and returns an object with
`step()` (one timed round: run the work and wait until it is done; may return a dict of small facts)
and `info` (a dict). `measure(benchmark, name, spec)` starts that process, runs `step()` once
(compilation; reported as first_run_s), then `warmup` more times, records the resident memory (the
baseline: inputs, parameters, compiled programs, the outputs of the last round), resets the peak-RSS
counter and serves timed rounds to pytest-benchmark over a pipe. Afterwards it reads the peak:

    working set = peak RSS during the timed rounds - baseline

i.e. what a round needs beyond what is already resident (DESIGN.md section 7). On CPU each case
process is bound to one core (BENCH_CPUS) and the figures compare its CPU time (`time_key`): on a
small shared machine that is the case's time on its core without the slices other jobs take.
Processes are forked from a multiprocessing fork server that has imported torch, torch_xla, jax and
our packages once (importing them takes ~10 s here), so every case still runs in a process of its own.

Figures. `record(name, value, unit, note)` puts a named figure into this run's summary
(bench/results/summary.json, a flat {name: value} map; details beside it) and checks it against
bench/floors.toml. The figures of a run are printed as a table at the end of the session.

Modes. "full" (make bench) and "fast" (the CI subset: small shapes, its own floors, results under
bench/results/fast/). On TPU the sections are "tpu-full" / "tpu-fast".
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
FLOORS_FILE = BENCH / "floors.toml"

# Modules the fork server imports once; every case process is forked from it.
PRELOAD = [
    "torch", "torch_xla", "torch_xla.core.xla_builder", "torch_xla.debug.metrics", "jax", "torchax",
    "kernels", "kernels.binding", "kernels.pallas_attention", "kernels.pallas_cross_entropy",
    "model.qwen3", "model.diffusion", "data", "train.config", "train.trainer", "bench.harness",
    "bench.cases",
]

# --------------------------------------------------------------------------------------------------
# mode
# --------------------------------------------------------------------------------------------------

_STATE = {"size": "full", "platform": None}


def set_size(size: str) -> None:
    if size not in ("full", "fast"):
        raise ValueError(f"bench size must be full or fast, got {size!r}")
    _STATE["size"] = size


def size() -> str:
    """'full' or 'fast'."""
    return _STATE["size"]


def is_fast() -> bool:
    return size() == "fast"


def on_tpu() -> bool:
    """Whether the benchmarks run on a TPU (PJRT_DEVICE=TPU, or a TPU VM's libtpu without one)."""
    if _STATE["platform"] is None:
        dev = os.environ.get("PJRT_DEVICE", "").upper()
        if not dev:  # what torch_xla would pick: TPU when libtpu is installed and a chip is there
            import importlib.util

            chip = (os.environ.get("TPU_ACCELERATOR_TYPE") or Path("/dev/accel0").exists()
                    or Path("/dev/vfio/0").exists())
            dev = "TPU" if chip and importlib.util.find_spec("libtpu") is not None else "CPU"
        _STATE["platform"] = "TPU" if dev == "TPU" else "CPU"
    return _STATE["platform"] == "TPU"


def section() -> str:
    """The floors.toml section that applies to this run."""
    return ("tpu-" if on_tpu() else "") + size()


def results_dir() -> Path:
    d = BENCH / "results"
    return d / "fast" if is_fast() else d


# --------------------------------------------------------------------------------------------------
# case processes (parent side)
# --------------------------------------------------------------------------------------------------


def child_environment() -> None:
    """Environment the case processes inherit (set before the fork server starts)."""
    os.environ.setdefault("PJRT_DEVICE", "TPU" if on_tpu() else "CPU")
    if not on_tpu():
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Large buffers go straight to mmap and back to the OS when freed, so resident memory tracks
    # what is alive (glibc's default threshold adapts upwards and keeps freed buffers mapped).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    # Every design on huge pages, as the trainer's entry points run (train/hostmem.py): a fork server's
    # children inherit the allocator settings it was started with.
    from train import hostmem

    if hostmem.wanted():
        os.environ.update(hostmem.environment())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    pythonpath = os.environ.get("PYTHONPATH", "")
    if str(ROOT) not in pythonpath.split(os.pathsep):
        os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + pythonpath if pythonpath else "")


_CTX: dict = {}


def _context():
    if "ctx" not in _CTX:
        child_environment()
        method = os.environ.get("BENCH_START_METHOD", "forkserver")
        ctx = mp.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)
        _CTX["ctx"] = ctx
    return _CTX["ctx"]


class CaseError(RuntimeError):
    pass


class CaseProcess:
    """One case in its own process; `run()` is one timed round."""

    def __init__(self, name: str, spec: dict, timeout_s: float | None = None):
        ctx = _context()
        self.name = name
        self.timeout_s = timeout_s or float(os.environ.get("BENCH_CASE_TIMEOUT_S", "3600"))
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(spec, child_conn), name=f"bench-{name}",
                                daemon=True)
        self.proc.start()
        child_conn.close()
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.facts: list[dict] = []
        try:
            self.info = self._expect("ready")
        except BaseException:
            self.close()
            raise

    def _expect(self, tag: str):
        deadline = time.monotonic() + self.timeout_s
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise CaseError(f"case {self.name}: its process exited with code "
                                f"{self.proc.exitcode} before '{tag}' (killed for memory?)")
            if time.monotonic() > deadline:
                raise CaseError(f"case {self.name}: no '{tag}' within {self.timeout_s:.0f} s")
        try:
            msg = self.conn.recv()
        except EOFError:
            self.proc.join(timeout=10)
            raise CaseError(f"case {self.name}: its process closed the pipe before '{tag}' "
                            f"(exit code {self.proc.exitcode})") from None
        if msg[0] == "error":
            raise CaseError(f"case {self.name} failed in its process:\n{msg[1]}")
        if msg[0] != tag:
            raise CaseError(f"case {self.name}: expected '{tag}', got {msg[0]!r}")
        return msg[1]

    def run(self) -> None:
        self.conn.send("run")
        wall, cpu, facts = self._expect("done")
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.facts.append(facts or {})

    def memory(self) -> dict:
        self.conn.send("memory")
        return self._expect("memory")

    def close(self) -> None:
        try:
            self.conn.send("quit")
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# Results of the cases measured in this session, by name (also written to cases.json).
CASES: dict[str, dict] = {}


def measure(benchmark, name: str, spec: dict, *, rounds: int, group: str | None = None) -> dict:
    """Run case `spec` in a fresh process for `rounds` timed rounds under pytest-benchmark.

    Returns (and keeps in CASES[name]) the case's info plus: round_s / median_s / min_s (wall, as
    timed inside the case process), round_cpu_s / median_cpu_s (CPU time of the case process, all
    threads: the work done, whatever else shares the cores), peak_rss_bytes, baseline_rss_bytes,
    working_set_bytes, and the facts of the last round.
    """
    if group:
        benchmark.group = group
    case = CaseProcess(name, spec)
    try:
        benchmark.pedantic(case.run, rounds=rounds, iterations=1, warmup_rounds=0)
        mem = case.memory()
    finally:
        case.close()
    res = dict(case.info)
    res.update(mem)
    res.update({
        "name": name,
        "round_s": case.wall, "median_s": statistics.median(case.wall), "min_s": min(case.wall),
        "round_cpu_s": case.cpu, "median_cpu_s": statistics.median(case.cpu),
        "round_facts": case.facts, "last": case.facts[-1] if case.facts else {},
        "load_avg_1m": os.getloadavg()[0],
    })
    res["working_set_bytes"] = max(res["peak_rss_bytes"] - res["baseline_rss_bytes"], 0)
    if res.get("matmul_flops"):
        res["gflop_per_s"] = res["matmul_flops"] / res[time_key(res)] / 1e9
    CASES[name] = res
    benchmark.extra_info.update({k: res[k] for k in (
        "median_s", "median_cpu_s", "first_run_s", "peak_rss_bytes", "working_set_bytes")})
    for key in ("matmul_flops", "gflop_per_s", "tokens_per_step"):
        if key in res:
            benchmark.extra_info[key] = res[key]
    _write_cases()
    return res


def _write_cases() -> None:
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "cases.json", json.dumps({"cases": CASES, "machine": machine()}, indent=2,
                                                 default=str) + "\n")


def time_key(res: dict) -> str:
    """Which of a case's times the figures compare: when its process was bound to one core (pin_cpus;
    BENCH_CPUS=1, the default), its CPU time: the time the case took on its core, minus the slices
    other jobs on this shared machine took from it (those inflate wall-clock times by 1-2x here,
    differently from case to case). On an accelerator, or bound to more cores or none, wall time."""
    cpus = res.get("cpus")
    return "median_cpu_s" if cpus is not None and len(cpus) == 1 else "median_s"


def ratio(num: str, den: str, key: str = "time") -> float | None:
    """CASES[num][key] / CASES[den][key], or None when either case has not run in this session.
    key "time" is each case's time_key(); "wall" is median_s. Working sets below 1 MiB count as 1 MiB (a
    ratio over almost nothing is noise)."""
    if num in CASES and den in CASES:
        pick = lambda res: time_key(res) if key == "time" else {"wall": "median_s"}.get(key, key)  # noqa: E731
        lo = float(1 << 20) if key == "working_set_bytes" else 0.0
        den_value = max(float(CASES[den][pick(CASES[den])]), lo)
        if den_value > 0:
            return max(float(CASES[num][pick(CASES[num])]), lo) / den_value
    return None


def case_time(name: str) -> float:
    """The case's median time as the figures use it (time_key())."""
    return CASES[name][time_key(CASES[name])]


# --------------------------------------------------------------------------------------------------
# case processes (child side)
# --------------------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start or since the last reset_peak()."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the peak-RSS counter (VmHWM) to the current RSS (Linux /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """CPU time of this process, all threads (CLOCK_PROCESS_CPUTIME_ID: not tick-rounded)."""
    return time.process_time()


def wait_device() -> None:
    """Cut the lazy graph, run it, and wait until the device is done."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    torch_xla.sync()
    xm.wait_device_ops()


def device_memory(device) -> dict:
    """Device memory figures on an accelerator (empty on CPU, where host RSS is the memory)."""
    if not on_tpu():
        return {}
    try:
        import torch_xla.core.xla_model as xm

        info = xm.get_memory_info(device)
        return {f"device_{k}": v for k, v in info.items()}
    except Exception:  # best effort: not every runtime reports it
        return {}


def compile_count() -> int:
    """Graphs torch_xla has compiled in this process so far (-1 when unknown)."""
    try:
        import torch_xla.debug.metrics as met

        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0
    except Exception:
        return -1


def resolve_builder(path: str):
    module, _, fn = path.partition(":")
    return getattr(importlib.import_module(module), fn)


def pin_cpus(want: int | str | None = None) -> list[int] | None:
    """On CPU, bind this process to `want` cores (a case's spec "cpus"; else BENCH_CPUS, default 1;
    "all" = no binding), the last ones it may use. XLA sizes its thread pools from the affinity
    mask, so every case then runs with the same parallelism whatever else is running: on a small
    shared machine a case that can use two idle cores and one that cannot would otherwise compare the
    machine's load, not the code."""
    want = str(want if want is not None else os.environ.get("BENCH_CPUS", "1")).strip().lower()
    if on_tpu() or want == "all" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-max(1, min(int(want), len(allowed))):]
    os.sched_setaffinity(0, chosen)
    import torch

    torch.set_num_threads(len(chosen))
    return chosen


def serve(spec: dict, conn) -> None:
    """Case process main: build, compile, then serve timed rounds over `conn`."""
    try:
        cpus = pin_cpus(spec.get("cpus"))  # before the XLA client exists: it sizes its thread pools from this
        import logging

        logging.getLogger("absl").setLevel(logging.ERROR)
        import torch_xla

        device = torch_xla.device()  # before any autograd in this process (DESIGN.md section 6)
        case = resolve_builder(spec["builder"])(spec, device)
        t0, c0 = time.perf_counter(), cpu_seconds()
        first_facts = case.step()
        first_wall, first_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        peak_with_compile = peak_rss_bytes()
        for _ in range(int(spec.get("warmup", 1))):
            case.step()
        gc.collect()
        baseline = rss_bytes()
        reset = reset_peak()
        compiles = compile_count()
        info = dict(case.info)
        info.update({"spec": spec, "first_run_s": first_wall, "first_run_cpu_s": first_cpu,
                     "first_facts": first_facts or {}, "peak_rss_with_compile_bytes": peak_with_compile,
                     "peak_counter_reset": reset, "pid": os.getpid(), "cpus": cpus})
        conn.send(("ready", info))
        while True:
            cmd = conn.recv()
            if cmd == "run":
                t0, c0 = time.perf_counter(), cpu_seconds()
                facts = case.step()
                conn.send(("done", (time.perf_counter() - t0, cpu_seconds() - c0, facts)))
            elif cmd == "memory":
                mem = {"peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline,
                       "compiles_during_rounds": compile_count() - compiles}
                mem.update(device_memory(device))
                conn.send(("memory", mem))
            else:
                break
    except BaseException:  # report, then exit: the parent turns it into a test failure
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
        raise
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# floors
# --------------------------------------------------------------------------------------------------


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            from pip._vendor import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


@dataclass(frozen=True)
class Bound:
    min: float | None = None
    max: float | None = None
    measured: str = ""
    where: str = ""

    def violation(self, name: str, value: float) -> str | None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return f"{name} is not a number ({value!r}); bound set in {self.where}"
        if self.min is not None and value < self.min:
            return (f"{name} = {value:.4g} is below its floor {self.min:g} ({self.where}; "
                    f"measured when set: {self.measured or 'n/a'})")
        if self.max is not None and value > self.max:
            return (f"{name} = {value:.4g} is above its ceiling {self.max:g} ({self.where}; "
                    f"measured when set: {self.measured or 'n/a'})")
        return None

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return ", ".join(parts)


def load_bounds(path: Path = FLOORS_FILE, sect: str | None = None) -> dict[str, Bound]:
    """{figure: Bound} for this run: the [any] table overlaid with the run's section
    ([full], [fast], [tpu-full], [tpu-fast])."""
    sect = sect or section()
    data = _load_toml(path) if path.exists() else {}
    out: dict[str, Bound] = {}
    for name in ("any", sect):
        for fig, entry in (data.get(name) or {}).items():
            if not isinstance(entry, dict):
                raise ValueError(f"{path.name} [{name}] {fig}: expected a table with min/max")
            unknown = set(entry) - {"min", "max", "measured"}
            if unknown:
                raise ValueError(f"{path.name} [{name}] {fig}: unknown keys {sorted(unknown)}")
            out[fig] = Bound(entry.get("min"), entry.get("max"), str(entry.get("measured", "")),
                             f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} [{name}]")
    return out


# --------------------------------------------------------------------------------------------------
# figures and the summary
# --------------------------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: float
    unit: str = ""
    note: str = ""
    bound: str = ""
    status: str = "-"  # ok | FAIL | - (no bound)
    message: str = ""
    recorded_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))


FIGURES: dict[str, Figure] = {}
_BOUNDS: dict = {}


class FigureList(list):
    """(name, value, unit, note) figures for record_figure.many; a figure whose cases have not run in
    this session (value None) is left out."""

    def add(self, name: str, value: float | None, unit: str, note: str) -> None:
        if value is not None:
            self.append((name, value, unit, note))


def bounds() -> dict[str, Bound]:
    if _BOUNDS.get("section") != section():
        _BOUNDS["section"] = section()
        _BOUNDS["bounds"] = load_bounds()
    return _BOUNDS["bounds"]


def record(name: str, value: float, unit: str = "", note: str = "") -> str | None:
    """Put a figure into this run's summary; returns the bound violation message, if any."""
    value = float(value)
    bound = bounds().get(name)
    message = bound.violation(name, value) if bound else None
    FIGURES[name] = Figure(name, value, unit, note, bound.describe() if bound else "",
                           ("FAIL" if message else "ok") if bound else "-", message or "")
    write_summary()
    return message


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "device": "TPU" if on_tpu() else "CPU"}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_summary() -> None:
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "summary.json",
                  json.dumps({n: f.value for n, f in FIGURES.items()}, indent=2) + "\n")
    details = {"size": size(), "section": section(), "machine": machine(),
               "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "figures": {n: asdict(f) for n, f in FIGURES.items()}}
    _atomic_write(out / "summary_details.json", json.dumps(details, indent=2) + "\n")
    _atomic_write(out / "summary.txt", table() + "\n")


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:.3e}"


def table() -> str:
    rows = [("figure", "value", "unit", "bound", "status", "note")]
    for f in FIGURES.values():
        rows.append((f.name, _fmt(f.value), f.unit, f.bound, f.status, f.note))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    return "\n".join(lines).rstrip()
