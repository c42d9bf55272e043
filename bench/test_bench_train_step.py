"""One full SFT step (forward, backward, clipping, AdamW update) of `qwen3-tiny` with the Qwen3
tokenizer and its 151,936-entry vocabulary on the bundled instruction data, three designs:

* ours: the trainer's own step (Trainer.train_step) with packed rows and the Pallas kernels
  (model.attention_kernel=pallas, model.loss_kernel=pallas).
* reference: the same step with our pure-jnp reference kernels (dense attention, dense logits).
* seed_style: the seed trainer's design built in bench/cases.py from our own modules: the same
  examples one per row, padded to the longest in the batch; dense attention with an additive mask
  and K/V repeated per head; full-logit fp32 cross-entropy, then masked (the `naive` kernels).

All three process the same examples (the first packed batches of the trainer's stream; the
seed-style batch holds exactly their examples), so the step-time ratio is the ratio of non-padding
tokens/s. One case per process; memory as in the kernel suites. Not in the fast subset: compiling
one step graph of the model with the interpreted kernels takes ~40 s here.

On a TPU the same cases run with the Mosaic kernels (bf16 autocast, precision=auto) and report
model FLOP utilisation against the chip's published peak.

    pytest bench/test_bench_train_step.py --benchmark-only
"""

from __future__ import annotations

import os
import statistics

import pytest

from bench import harness
from kernels import tpu as ktpu

# The trainer's defaults (train/configs): 16 rows x 128 tokens per step.
SHAPE = dict(rows=16, block_size=128, batches=1)
ROUNDS = 3
VARIANTS = ("ours", "reference", "seed_style")


def _name(variant):
    return f"train-{variant}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, record_figure, variant, tmp_path):
    spec = dict(builder="bench.cases:train_step", variant=variant, warmup=1,
                output_dir=str(tmp_path / "run"), **SHAPE)
    res = harness.measure(benchmark, _name(variant), spec, rounds=ROUNDS, group="train_step")
    assert res["compiles_during_rounds"] == 0, "the step recompiled between rounds"
    assert res["last"]["loss"] > 0
    record_figure.many(_figures())


@pytest.mark.parametrize("variant", ("ours", "seed_style"))
def test_train_step_lm_head_share(benchmark, record_figure, variant):
    """Profile: the step's LM-head loss alone (forward + backward of the variant's loss kernel at
    the shape it has inside the step: rows x length tokens, the step's loss positions, hidden 256,
    vocabulary 151,936), as a share of the whole step's time. The rest is the decoder layers, the
    embedding gradient and the optimizer update over the 39M-row-entry tied embedding."""
    step = harness.CASES.get(_name(variant))
    if step is None:
        pytest.skip(f"needs test_train_step[{variant}] in the same session")
    rows, length = step["batch_shapes"][0]
    positions = statistics.median(f["loss_positions"] for f in step["round_facts"])
    spec = dict(builder="bench.cases:cross_entropy", impl="pallas" if variant == "ours" else "naive",
                mode="fwd_bwd", N=rows * length, H=step["hidden_size"], V=step["vocab_size"],
                fraction=positions / (rows * length), warmup=1)
    res = harness.measure(benchmark, f"train-lm-head-{variant}", spec, rounds=ROUNDS,
                          group="train_step lm-head profile")
    alone, whole = harness.case_time(res["name"]), harness.case_time(_name(variant))
    record_figure(f"train_step_lm_head_share_{variant}", alone / whole, "",
                  f"LM-head loss fwd+bwd alone ({alone:.2f} s, {res['computed_rows']} of "
                  f"{rows * length} rows through the matmuls) / whole step ({whole:.2f} s)")


def tpu_peak_tflops() -> tuple[str, float] | None:
    """(chip, peak bf16 TFLOP/s) of this TPU, from the accelerator type; None when unknown."""
    if os.environ.get("BENCH_TPU_PEAK_TFLOPS"):
        return "given", float(os.environ["BENCH_TPU_PEAK_TFLOPS"])
    kind = os.environ.get("TPU_ACCELERATOR_TYPE", "")
    if not kind:
        try:
            from torch_xla._internal import tpu

            kind = tpu.get_tpu_type()
        except Exception:
            return None
    kind = kind.lower()
    for chip, names in (("v5e", ("v5e", "v5lite", "v5litepod")), ("v5p", ("v5p",)),
                        ("v6e", ("v6e", "v6lite")), ("v4", ("v4",))):
        if any(kind.startswith(n) for n in names):
            return chip, ktpu.CHIPS[chip].peak_bf16_flops / 1e12
    return None


def _figures():
    figs = harness.FigureList()
    add, n = figs.add, _name

    add("train_step_speedup_vs_seed_style", harness.ratio(n("seed_style"), n("ours")), "x",
        "non-padding tokens/s, ours / seed-style (same examples per step)")
    add("train_step_speedup_vs_seed_style_wall",
        harness.ratio(n("seed_style"), n("ours"), "wall"), "x",
        "the same in wall-clock time (shared machine: noisy)")
    add("train_step_speedup_vs_reference", harness.ratio(n("reference"), n("ours")), "x",
        "tokens/s, ours / our reference kernels (packed, dense jnp)")
    add("train_step_peak_mem_ratio_seed_over_ours",
        harness.ratio(n("seed_style"), n("ours"), "working_set_bytes"), "x",
        "step working set (peak RSS - baseline), seed-style / ours")
    for variant in VARIANTS:
        res = harness.CASES.get(n(variant))
        if not res:
            continue
        tps = res["tokens_per_step"] / harness.case_time(n(variant))
        fig = "train_step_tokens_per_s" if variant == "ours" else f"train_step_{variant}_tokens_per_s"
        add(fig, tps, "tok/s", f"{variant}: {res['tokens_per_step']:.0f} non-padding tokens in "
                               f"{res['batch_shapes'][0][0]}x{res['batch_shapes'][0][1]} rows per step")
    ours = harness.CASES.get(n("ours"))
    if ours:
        achieved = ours["model_matmul_flops"] / harness.case_time(n("ours"))
        add("train_step_model_gflop_per_s", achieved / 1e9, "GFLOP/s",
            "useful matmul FLOPs (layers on real tokens, attention within examples, LM head on "
            "loss positions) / step time")
        peak = tpu_peak_tflops() if harness.on_tpu() else None
        if peak:
            add("train_step_mfu", achieved / (peak[1] * 1e12), "",
                f"model FLOP utilisation against {peak[0]}'s {peak[1]:g} bf16 TFLOP/s")
    return figs
