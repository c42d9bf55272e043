"""The kernels and the train step compiled for TPU by libtpu on this machine: no TPU needed.

libtpu compiles for any TPU generation and topology on a CPU (DESIGN.md section 6): Mosaic and XLA:TPU
run here, so a VMEM overflow, a layout error or a train step that does not fit a chip's HBM is a failing
test here, not a crash on the first step of a rented pod.

`make test` runs a subset: per generation the largest preset widths (cross-entropy at hidden 4096, fp32
and bf16; attention at 8,192 tokens, fp32, causal; the tiny preset's head_dim 32), the 1,024-token
blocks the README documents, the Mosaic IR version, the VMEM estimates against what Mosaic allocates,
refusals, and qwen3-tiny's whole train step (FSDP over 4 chips, scan, remat, bf16) compiled for v5e.
`make tpu-check` (--tpu-full) compiles the whole matrix: every preset's attention heads and head_dim
at 128-8,192 tokens, the cross-entropy at every preset's hidden size (and 5120, Qwen3-14B's) at the
recipes' tokens per chip, fp32 and bf16, causal or not, forward and backward, on v4, v5e, v5p and v6e.
Every case must compile or be refused in one line that names the config key and the chip.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from kernels import pallas_attention as pa  # noqa: E402
from kernels import pallas_cross_entropy as pce  # noqa: E402
from kernels import tpu as ktpu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="needs libtpu: pip install -e '.[tpu-compile]'")
pytestmark = pytest.mark.tpu_compile

GENERATIONS = ("v4", "v5e", "v5p", "v6e")
_TOPOLOGY = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
# Every preset's (query heads, kv heads, head_dim) and hidden size; 5120 is Qwen3-14B's width.
HEADS = {"qwen3-tiny": (4, 2, 32), "qwen3-0.6b/1.7b": (16, 8, 128), "qwen3-4b/8b": (32, 8, 128)}
PRESET_HIDDEN = {128: 320, 1024: 151936, 2048: 151936, 2560: 151936, 4096: 151936}  # hidden -> vocab
F32, BF16 = jnp.float32, jnp.bfloat16


def _full(request) -> bool:
    return bool(request.config.getoption("--tpu-full"))


@functools.lru_cache(maxsize=None)
def _device(gen):
    return ktpu.topology(_TOPOLOGY[gen]).devices[0]


def _sds(gen, shape, dtype):
    mesh = jax.sharding.Mesh([_device(gen)], ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _compile_or_refuse(fn, *args, must_compile: bool, chip: str):
    """Compile fn for its arguments' device. A refusal must be the kernels' one-line ValueError naming
    the config key and the chip; a compiler error (XlaRuntimeError) fails the test."""
    try:
        jax.jit(fn).lower(*args).compile()
    except ValueError as err:
        message = str(err).split("\n--------------------")[0].strip()  # JAX appends its traceback note
        assert not must_compile, f"refused where it must compile: {message}"
        assert "\n" not in message and "_kernel_config" in message and f"TPU {chip}" in message, message
        return "refused"
    return "compiled"


def _attention_case(gen, heads, length, dtype, causal, blocks, rows=2):
    hq, hkv, d = heads
    q, kv = _sds(gen, (rows, hq, length, d), dtype), _sds(gen, (rows, hkv, length, d), dtype)
    seg = _sds(gen, (rows, length), jnp.int32)
    static = dict(causal=causal, sm_scale=None, interpret=False, chip=gen, block_sizes=blocks)
    fwd = (functools.partial(pa.attention_fwd, **static), (q, kv, kv, seg))
    lse = _sds(gen, (rows, hq, length), F32)
    bwd = (functools.partial(pa.attention_bwd, **static), (q, kv, kv, seg, q, lse, q))
    return fwd, bwd


def _ce_case(gen, hidden, vocab, tokens, dtype):
    h, w = _sds(gen, (tokens, hidden), dtype), _sds(gen, (vocab, hidden), dtype)
    t, tw = _sds(gen, (tokens,), jnp.int32), _sds(gen, (tokens,), F32)
    fwd = (functools.partial(pce.cross_entropy_fwd, interpret=False, chip=gen), (h, w, t, tw))
    bwd = (functools.partial(pce.cross_entropy_bwd, interpret=False, chip=gen),
           (h, w, t, tw, _sds(gen, (tokens,), F32), _sds(gen, (), F32)))
    return fwd, bwd


# ---- the matrix ---------------------------------------------------------------------------------

# The CI subset: each generation once at its hardest case for each kernel (fp32 runs the slowest
# compiles: HIGHEST-precision matmuls), the tiny preset's head_dim 32 everywhere, 1,024-token blocks
# refused on v4 and compiled on v6e.
FAST_ATTENTION = [("v4", ("qwen3-0.6b/1.7b", 8192, F32, True, None)), ("v5p", ("qwen3-0.6b/1.7b", 8192, F32, True, None)),
                  ("v5e", ("qwen3-4b/8b", 4096, BF16, True, None))] \
    + [(gen, ("qwen3-tiny", 128, BF16, False, None)) for gen in GENERATIONS] \
    + [(gen, ("qwen3-4b/8b", 1024, BF16, False, {"block_q": 1024, "block_k": 1024})) for gen in ("v4", "v6e")]
FAST_CE = [("v4", F32), ("v4", BF16), ("v5e", F32), ("v5p", BF16), ("v6e", BF16)]  # at hidden 4096
FULL_ATTENTION = ([(h, n, dt, c, None) for h in HEADS for n in (128, 1024, 2048, 4096, 8192) for dt in (BF16, F32)
                   for c in (False, True)]
                  + [(h, n, dt, False, {"block_q": b, "block_k": b}) for h in HEADS for n in (1024, 8192)
                     for dt in (BF16, F32) for b in (512, 1024)])


def _attention_params(full):
    cases = [(gen, case) for gen in GENERATIONS for case in FULL_ATTENTION] if full else FAST_ATTENTION
    return [pytest.param(gen, *case, id=f"{gen}-{case[0]}-L{case[1]}-{jnp.dtype(case[2]).name}"
                         f"{'-causal' if case[3] else ''}{'-blocks%d' % case[4]['block_q'] if case[4] else ''}")
            for gen, case in cases]


def pytest_generate_tests(metafunc):
    full = metafunc.config.getoption("--tpu-full")
    if metafunc.function.__name__ == "test_attention_compiles":
        metafunc.parametrize("gen,heads_name,length,dtype,causal,blocks", _attention_params(full))
    if metafunc.function.__name__ == "test_block_diffusion_attention_compiles":
        metafunc.parametrize("bd_gen,heads_name,length,dtype", [
            pytest.param(*case, id=f"{case[0]}-{case[1]}-L{case[2]}-{jnp.dtype(case[3]).name}")
            for case in (BD_FULL if full else BD_FAST)])
    if metafunc.function.__name__ == "test_vmem_estimates_bound_what_mosaic_allocates":
        metafunc.parametrize("gen,case", _calibration_params(full))
    if metafunc.function.__name__ == "test_cross_entropy_compiles":
        if full:
            shapes = [(h, v, n) for h, v in PRESET_HIDDEN.items() for n in ((768,) if h == 128 else (8192, 65536))]
            cases = [(gen, shape, dt) for gen in GENERATIONS for shape in shapes + [(5120, 151936, 8192)]
                     for dt in (BF16, F32)]
        else:
            cases = [(gen, (4096, 151936, 8192), dt) for gen, dt in FAST_CE]
        metafunc.parametrize("gen,hidden,vocab,tokens,dtype", [
            pytest.param(gen, h, v, n, dt, id=f"{gen}-H{h}-N{n}-{jnp.dtype(dt).name}") for gen, (h, v, n), dt in cases])


@needs_libtpu
def test_attention_compiles(gen, heads_name, length, dtype, causal, blocks):
    """Forward, dq and dk/dv kernels at default blocks (chosen for the chip) must compile; explicit
    blocks compile or are refused in one line (1,024-token blocks do not fit v4's 16 MiB of VMEM)."""
    for fn, args in _attention_case(gen, HEADS[heads_name], length, dtype, causal, blocks):
        _compile_or_refuse(fn, *args, must_compile=blocks is None or gen != "v4", chip=gen)


BD_FAST = [("v5e", "qwen3-0.6b/1.7b", 4096, BF16), ("v4", "qwen3-tiny", 256, F32), ("v6e", "qwen3-4b/8b", 8192, BF16)]
BD_FULL = [(gen, h, n, dt) for gen in GENERATIONS for h in HEADS for n in (256, 4096, 16384) for dt in (BF16, F32)]


@needs_libtpu
def test_block_diffusion_attention_compiles(bd_gen, heads_name, length, dtype):
    """bd3lm's attention (the noised and the clean copy of a row: `length` = 2 x the row) with the
    block-diffusion rule in the masks and the schedule, forward and backward, at default blocks."""
    for fn, args in _attention_case(bd_gen, HEADS[heads_name], length, dtype, False, None):
        _compile_or_refuse(functools.partial(fn, block_diffusion=True), *args, must_compile=True, chip=bd_gen)


@needs_libtpu
def test_cross_entropy_compiles(gen, hidden, vocab, tokens, dtype):
    """Forward and backward at the chip's default tiles must compile at every preset's hidden size (a
    width no tile fits, 5120 in fp32 on v4, is refused in one line)."""
    preset = hidden in PRESET_HIDDEN
    for fn, args in _ce_case(gen, hidden, vocab, tokens, dtype):
        _compile_or_refuse(fn, *args, must_compile=preset, chip=gen)


# ---- the VMEM estimates against Mosaic ----------------------------------------------------------


def _chip_with_limit(gen: str, limit: int) -> ktpu.TpuChip:
    """`gen` made to declare exactly `limit` bytes of scoped VMEM for its kernels (and plan for all of it)."""
    import dataclasses

    chip = ktpu.get_chip(gen)
    lo, hi = limit, 2 * limit + (4 << 20)  # the least VMEM whose kernel limit reaches `limit`
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if dataclasses.replace(chip, vmem_bytes=mid).kernel_vmem_limit < limit else (lo, mid)
    return dataclasses.replace(chip, name=f"{gen}-calibration", vmem_bytes=lo)


CALIBRATION = [("ce", "fwd", 2048, F32, (512, 512)), ("ce", "bwd", 4096, BF16, (512, 512)),
               ("ce", "bwd", 4096, F32, (128, 128)), ("attn", "fwd", 128, BF16, (1024, 1024)),
               ("attn", "dq", 128, F32, (1024, 1024)), ("attn", "dkv", 256, F32, (512, 512)),
               ("attn", "dkv", 128, BF16, (1024, 1024)), ("attn", "dkv", 32, BF16, (512, 512))]


def _calibration_params(full):
    gens = GENERATIONS if full else ("v5e",)
    cases = CALIBRATION if full else [CALIBRATION[i] for i in (1, 5, 6)]
    return [pytest.param(gen, case, id=f"{gen}-{case[0]}-{case[1]}-{case[2]}-{jnp.dtype(case[3]).name}-{case[4][0]}")
            for gen in gens for case in cases]


@needs_libtpu
def test_vmem_estimates_bound_what_mosaic_allocates(gen, case):
    """Each kernel declares a scoped VMEM limit of exactly its own estimate and must still compile:
    the estimates that choose the tiles and refuse configs are upper bounds of what Mosaic allocates
    on that chip (an estimate below it fails here). Estimates beyond the chip's VMEM are skipped."""
    op, which, width, dtype, (b1, b2) = case
    if op == "ce":
        need = pce.vmem_estimate(which, b1, b2, width, dtype, dtype)
    else:
        need = pa.vmem_estimate(which, b1, b2, width, dtype, gen)
    if need > ktpu.get_chip(gen).kernel_vmem_limit:
        pytest.skip(f"the estimate, {need / 2**20:.1f} MiB, exceeds what {gen} gives a kernel")
    chip = _chip_with_limit(gen, need)
    if op == "ce":
        # the other direction at its smallest tiles: the wrapper checks both against the same chip
        bs = (pce.BlockSizes(block_tokens=b1, block_vocab=b2, block_tokens_bwd=128, block_vocab_bwd=128)
              if which == "fwd" else
              pce.BlockSizes(block_tokens=128, block_vocab=128, block_tokens_bwd=b1, block_vocab_bwd=b2))
        fwd, bwd = _ce_case(gen, width, 151936, 8192, dtype)
        fn, args = fwd if which == "fwd" else bwd
        fn = functools.partial(fn, chip=chip, block_sizes=bs)
        if which == "bwd":
            assert pce.bwd_weight_buffers(b1, b2, width, dtype, dtype, chip) == 2
    else:
        blocks = {"fwd": {"block_q": b1, "block_k": b2}, "dq": {"block_q_dq": b1, "block_k_dq": b2},
                  "dkv": {"block_q_dkv": b1, "block_k_dkv": b2}}[which]
        plan = pa._plan(dict(block_q=128, block_k=128, **blocks) if which != "fwd" else blocks, 2048, False,
                        chip=chip, head_dim=width, dtype=dtype)
        assert 0 <= plan.vmem_limit - need < 16  # declares its estimate (to the byte the rounding allows)
        q, kv = _sds(gen, (1, 16, 2048, width), dtype), _sds(gen, (1, 8, 2048, width), dtype)
        seg, rows = _sds(gen, (1, 2048), jnp.int32), _sds(gen, (1, 16, 2048), F32)
        static = dict(causal=False, sm_scale=1.0, plan=plan, interpret=False)
        if which == "fwd":
            fn, args = functools.partial(pa._fwd_padded, **static), (q, kv, kv, seg)
        else:
            fn = functools.partial(pa._dq_padded if which == "dq" else pa._dkv_padded, **static)
            args = (q, kv, kv, seg, rows, rows, q)
    jax.jit(fn).lower(*args).compile()


# ---- refusals, IR version -----------------------------------------------------------------------


def test_tiles_that_cannot_fit_are_refused_in_one_line():
    """Before anything compiles: the key, the chip and the VMEM it would need, in one line."""
    with pytest.raises(ValueError) as err:
        pce.resolve_block_sizes({"block_vocab_bwd": 2048}, False, chip="v4", h=4096,
                                hidden_dtype=F32, weight_dtype=F32)
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.loss_kernel_config:")
    assert "TPU v4" in message and "MiB of VMEM" in message and "block_vocab_bwd=2048" in message
    with pytest.raises(ValueError) as err:
        pa._plan({"block_q": 1024, "block_k": 1024}, 8192, False, chip="v4", head_dim=128, dtype=F32)
    assert str(err.value).startswith("model.attention_kernel_config:") and "TPU v4" in str(err.value)
    # The chip's own defaults fit: the same shapes with nothing given pick smaller tiles.
    assert pce.resolve_block_sizes(None, False, chip="v4", h=4096, hidden_dtype=F32, weight_dtype=F32).tokens_bwd == 128
    assert pa._plan(None, 8192, False, chip="v4", head_dim=128, dtype=F32).fwd[0] <= 512


def test_tiles_follow_the_chip():
    """Large VMEM (v5e, v6e: 128 MiB) keeps the 512 x 512 tiles where v4 (16 MiB) must go smaller."""
    big = pce.tiles_for("v6e", 4096, BF16, BF16)
    small = pce.tiles_for("v4", 4096, BF16, BF16)
    assert (big.block_tokens, big.block_vocab, big.tokens_bwd, big.block_vocab_bwd) == (512, 512, 512, 512)
    assert small.tokens_bwd * small.block_vocab_bwd < 512 * 512
    assert pce.bwd_weight_buffers(128, 128, 4096, F32, F32, "v4") == 1  # fp32 at 4096 fits v4 with one W slab
    assert pce.bwd_weight_buffers(512, 512, 4096, BF16, BF16, "v6e") == 2


def test_mosaic_kernels_carry_the_pinned_ir_version():
    """Every kernel serialises at the Mosaic IR version the pinned libtpu reads (version 8 from jax
    0.7.1's default is refused by libtpu 0.0.21: 'expected <= 7'), whatever JAX's default backend."""
    sds = jax.ShapeDtypeStruct
    ce = jax.jit(functools.partial(pce.cross_entropy_bwd, interpret=False, chip="v5e")).trace(
        sds((256, 128), BF16), sds((1000, 128), BF16), sds((256,), jnp.int32), sds((256,), F32), sds((256,), F32),
        sds((), F32)).lower(lowering_platforms=("tpu",))
    attn = jax.jit(functools.partial(pa.attention_bwd, causal=True, sm_scale=None, interpret=False, chip="v4")).trace(
        sds((1, 4, 256, 64), F32), sds((1, 2, 256, 64), F32), sds((1, 2, 256, 64), F32), sds((1, 256), jnp.int32),
        sds((1, 4, 256, 64), F32), sds((1, 4, 256), F32), sds((1, 4, 256, 64), F32)).lower(lowering_platforms=("tpu",))
    found = ktpu.mosaic_kernels(ce.compiler_ir()) + ktpu.mosaic_kernels(attn.compiler_ir())
    assert sorted(name for name, _ in found) == ["masked_attention_dkv", "masked_attention_dq", "masked_ce_bwd"]
    assert {version for _, version in found} == {ktpu.MOSAIC_IR_VERSION} == {7}


def test_libtpu_pin_matches_torch_xla_tpu_extra():
    """The tpu-compile extra pins the libtpu that torch_xla[tpu] installs, the one MOSAIC_IR_VERSION is for."""
    from importlib.metadata import requires

    wanted = [r for r in requires("torch_xla") if r.startswith("libtpu")]
    assert wanted and wanted[0].split(";")[0].strip() == f"libtpu=={ktpu.LIBTPU_VERSION}"
    assert f'"libtpu=={ktpu.LIBTPU_VERSION}"' in (ROOT / "pyproject.toml").read_text()


# ---- the whole train step -----------------------------------------------------------------------


def _compile_only(tmp_path, *overrides, timeout=600):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "train.run", f"output_dir={tmp_path}", *overrides,
                           f"compile_report={report}"], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc, (json.loads(report.read_text()) if report.exists() else None)


@needs_libtpu
def test_train_step_compiles_for_a_v5e_slice(tmp_path):
    """qwen3-tiny's whole step (forward, backward, clipping, AdamW) with the Mosaic kernels, FSDP over 4
    chips, decoder layers scanned with activation checkpointing, TPU's default precision (bf16 autocast),
    traced by torch_xla here and compiled by libtpu for v5e:2x2: parameters and optimizer state sharded
    4 ways and donated to their updates; FLOPs counted per layer."""
    from model.config import get_preset

    proc, r = _compile_only(
        tmp_path, "model.attention_kernel=pallas", "model.loss_kernel=pallas", "global_batch_size=8",
        "ici_mesh.fsdp=4", "model.remat.activation_checkpoint_layers=[Qwen3DecoderLayer]",
        "model.remat.scan_layers=model.layers", "compile_only=v5e:2x2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compile_only v5e:2x2: fits" in proc.stdout
    assert r["fits"] and r["chips"] == 4 and r["chip"] == "v5e"
    n_params = get_preset("qwen3-tiny").replace(vocab_size=320).num_parameters()
    total = 3 * 4 * n_params  # fp32 parameters, exp_avg, exp_avg_sq
    assert r["parameters"] + r["optimizer_state"] == pytest.approx(total / 4, rel=0.02)
    assert r["arguments"] < 0.4 * total  # sharded: about a quarter each (norms and scalars replicated)
    assert r["outputs"] < 64 << 10  # every updated tensor written over its donated input
    assert r["model_flops"] > 0 and 1.0 < r["flops"] / r["model_flops"] < 3.0  # remat recomputes the layers
    assert 0 < r["mfu_ceiling"] <= 1


@needs_libtpu
@pytest.mark.parametrize("vocab,report", [(8_000_000, "Largest program allocations"),
                                          (40_000_000, "one buffer alone exceeds the chip's HBM: shape = 'f32[40000000,128]{")],
                         ids=["program", "one-buffer"])
def test_compile_only_says_what_uses_the_memory_when_it_does_not_fit(tmp_path, vocab, report):
    """A step that cannot fit one v5e chip (a 4 GiB or a 20 GiB embedding, with its gradient and AdamW
    state): exit status 1 and what the compiler says uses the memory, in either of its two reports."""
    proc, r = _compile_only(tmp_path, f"model.vocab_size={vocab}", "model.attention_kernel=pallas",
                            "model.loss_kernel=pallas", "compile_only=v5e:1x1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "does NOT fit" in proc.stdout and report in proc.stdout and "levers:" in proc.stdout
    assert r is not None and not r["fits"] and r["hbm_per_chip"] > r["chip_hbm"]


def test_compile_only_rejects_an_unknown_topology(tmp_path):
    proc, _ = _compile_only(tmp_path, "compile_only=v9z:2x2", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: compile_only: TPU topology 'v9z:2x2'")


def test_both_libtpu_overflow_messages_are_parsed():
    """libtpu 0.0.21's words (the first verbatim from a run here, the second abridged): the shape keeps its layout braces (a shape
    holds ']' inside, so the report is cut at the closing quote, not the first bracket)."""
    from train.aot import _hbm_overflow

    one = ("RESOURCE_EXHAUSTED: Allocation (size=20480000000) would exceed memory (size=17179869184) :: "
           "#allocation1950 [shape = 'f32[40000000,128]{1,0:T(8,128)}', space=hbm, size = 0xffffffffffffffff, "
           "tag = 'output of convert.3145@{}'] :: <no-hlo-instruction>")
    assert _hbm_overflow(one) == (20480000000, "one buffer alone exceeds the chip's HBM: shape = "
                                  "'f32[40000000,128]{1,0:T(8,128)}', tag = 'output of convert.3145@{}'")
    program = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
               "Used 18.19G of 15.75G hbm. Exceeded hbm capacity by 2.44G.\n\nTotal hbm usage >= 18.19G:\n"
               "    reserved        258.00M \n\nLargest program allocations in hbm:\n\n"
               "  1. Size: 2.62G\n     Shape: bf16[28,8192,6144]{2,1,0}\n")
    needed, report = _hbm_overflow(program)
    assert needed == int(18.19 * (1 << 30))
    assert "Largest program allocations in hbm:" in report and "Shape: bf16[28,8192,6144]{2,1,0}" in report
    assert _hbm_overflow("INTERNAL: Mosaic failed to compile TPU kernel") is None
