"""Scan over layers (model.remat.scan_layers=model.layers): compile time stops growing with depth.

The trainer's step (forward, backward, clipping, AdamW) for `qwen3-tiny` variants of 2 and 16 decoder
layers (hidden 256, byte tokenizer), each in a fresh process (nothing cached), with the decoder weights
stacked and run as torch_xla's scan: one layer is traced and compiled whatever the depth, and the
optimizer updates one tensor per kind of weight, not one per layer. Full suite: both Pallas kernels
(interpret mode on CPU), 8 rows x 64 tokens; fast subset (CI): the reference kernels, 4 rows x 32
tokens (compiling the interpreted kernels costs ~20 s per case here and is the same at any depth).
Figures:

  scan_compile_time_ratio_16_over_2_layers    XLA compile time of the step (torch_xla's CompileTime
                                              metric over the first step), 16 layers / 2 layers
  scan_first_step_time_ratio_16_over_2_layers the whole first step (tracing, AOTAutograd, lowering,
                                              compiling, running), 16 / 2
  noscan_compile_time_ratio_16_over_2_layers  the same ratio with the layers unrolled: the baseline
                                              (full suite only: the 16-layer unrolled compile is slow)

and the scanned and unrolled 2-layer models' first-step losses agree (same weights, data, noise).

    pytest bench/test_bench_scan.py --benchmark-only [--fast]
"""

from __future__ import annotations

import dataclasses

import pytest

from bench import harness

LAYERS = (2, 16)
FULL = dict(rows=8, block_size=64, kernel="pallas")
FAST = dict(rows=4, block_size=32, kernel="reference")
ROUNDS = 2


def scan_step(spec: dict, device):
    """Case builder (runs in the case process): the trainer's step for a qwen3-tiny variant with
    spec["layers"] decoder layers, scanned or not; facts: loss, compile_s (XLA compile seconds
    during this step)."""
    import torch_xla.debug.metrics as met
    from omegaconf import open_dict

    from bench.cases import _Case
    from bench.harness import wait_device
    from model.config import get_preset
    from train.config import load_config
    from train.trainer import Trainer

    overrides = ["model=qwen3-tiny", "tokenizer_name=byte", f"global_batch_size={spec['rows']}",
                 f"data.block_size={spec['block_size']}", f"model.attention_kernel={spec['kernel']}",
                 f"model.loss_kernel={spec['kernel']}", "eval_max_batches=0", "generation.eval_exact_match_examples=0",
                 "data.sft.template=separator", f"output_dir={spec['output_dir']}"]
    if spec["scan"]:
        overrides.append("model.remat.scan_layers=model.layers")
    cfg = load_config(overrides)
    arch = dataclasses.replace(get_preset("qwen3-tiny"), num_hidden_layers=int(spec["layers"]))
    with open_dict(cfg):
        cfg.model.architecture = dataclasses.asdict(arch)
    trainer = Trainer(cfg, log=lambda *a, **k: None)

    def compile_seconds() -> float:
        data = met.metric_data("CompileTime")
        return data[1] / 1e9 if data else 0.0

    def step():
        before = compile_seconds()
        stats, _ = trainer.train_step()
        trainer.step += 1
        wait_device()
        return {"loss": float(stats["loss"].cpu()), "compile_s": compile_seconds() - before}

    info = {"suite": "scan", "layers": int(spec["layers"]), "scan": bool(spec["scan"]), "kernel": spec["kernel"],
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "scan_layers": trainer.model.scan_layers}
    return _Case(step, info)


def _case(benchmark, tmp_path, layers: int, scan: bool) -> dict:
    name = f"scan-{'on' if scan else 'off'}-{layers}L"
    spec = dict(builder="bench.test_bench_scan:scan_step", layers=layers, scan=scan, warmup=0,
                output_dir=str(tmp_path / name), **(FAST if harness.is_fast() else FULL))
    res = harness.measure(benchmark, name, spec, rounds=ROUNDS, group="scan")
    assert res["scan_layers"] is scan
    assert res["compiles_during_rounds"] == 0, "the step recompiled after the first one"
    return res


@pytest.mark.fast
@pytest.mark.parametrize("layers", LAYERS)
def test_scan_step(benchmark, record_figure, tmp_path, layers):
    res = _case(benchmark, tmp_path, layers, scan=True)
    assert res["first_facts"]["compile_s"] > 0
    short, deep = (harness.CASES.get(f"scan-on-{n}L") for n in LAYERS)
    if short and deep:
        record_figure.many([
            ("scan_compile_time_ratio_16_over_2_layers",
             deep["first_facts"]["compile_s"] / short["first_facts"]["compile_s"], "x",
             f"XLA compile of the scanned step: {deep['first_facts']['compile_s']:.1f} s at 16 layers, "
             f"{short['first_facts']['compile_s']:.1f} s at 2"),
            ("scan_first_step_time_ratio_16_over_2_layers", deep["first_run_s"] / short["first_run_s"], "x",
             f"first step incl. tracing: {deep['first_run_s']:.1f} s / {short['first_run_s']:.1f} s"),
        ])


@pytest.mark.parametrize("layers", LAYERS)
def test_unrolled_step(benchmark, record_figure, tmp_path, layers):
    """The baseline: the same steps with the decoder layers unrolled into the graph."""
    res = _case(benchmark, tmp_path, layers, scan=False)
    scanned = harness.CASES.get(f"scan-on-{layers}L")
    if scanned:  # same weights, data and noise: scanning changes how the graph is built, not the math
        assert scanned["first_facts"]["loss"] == pytest.approx(res["first_facts"]["loss"], rel=1e-5)
    short, deep = (harness.CASES.get(f"scan-off-{n}L") for n in LAYERS)
    if short and deep:
        record_figure("noscan_compile_time_ratio_16_over_2_layers",
                      deep["first_facts"]["compile_s"] / short["first_facts"]["compile_s"], "x",
                      f"XLA compile of the unrolled step: {deep['first_facts']['compile_s']:.1f} s at 16 "
                      f"layers, {short['first_facts']['compile_s']:.1f} s at 2")
