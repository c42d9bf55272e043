"""Decoding speed and quality: our sampler as it was (a fixed number of tokens per step, every step over the
whole sequence, every position decoded) against each faster mode of train/generate.py, in one run, each
configuration in its own process on one core.

* The demo checkpoint (qwen3-tiny trained by `make demo`'s run; trained here once per region length and cached
  under bench/results/cache/) over its first 100 held-out examples, with the demo's 8-token region and with a
  32-token region (a checkpoint trained with answers padded to 32): time per round, answer tokens/s and exact
  match per mode. `decode_speedup_vs_baseline` (32-token region; `_8` for the demo's) is the best speedup among
  the modes that lose at most 2 points of exact match; `decode_exact_match_drop_points` is that mode's loss.
* A random model of qwen3-0.6b's width (8 of its 28 decoder layers, the Qwen3 vocabulary), one row, 256 generated
  tokens in 128 steps, blocks of 32: speed alone (a random model is never confident: only the cache helps).
* Fast subset (CI): a small random model, 64 tokens in blocks of 16, baseline against the dual cache.

    pytest bench/test_bench_decode.py --benchmark-only          (make bench)
    pytest bench/test_bench_decode.py --benchmark-only --fast   (CI)
"""

from __future__ import annotations

import pytest

from bench import harness
from bench.decode_cases import demo_checkpoint

# the sampler before the decoding modes existed: its own defaults, nothing stops early
PLAIN = dict(steps=None, threshold=None, factor=None, cache="none", stop_at_eos=False)
DEMO_MODES = {
    "baseline": dict(PLAIN, block_length=None),
    "stop": dict(PLAIN, block_length=None, stop_at_eos=True),
    "threshold": dict(PLAIN, block_length=None, stop_at_eos=True, threshold=0.9),
    "threshold-b8": dict(PLAIN, block_length=8, stop_at_eos=True, threshold=0.9),
    "threshold-b8-prefix": dict(PLAIN, block_length=8, stop_at_eos=True, threshold=0.9, cache="prefix"),
    "threshold-b8-dual": dict(PLAIN, block_length=8, stop_at_eos=True, threshold=0.9, cache="dual"),
    "factor-b8-dual": dict(PLAIN, block_length=8, stop_at_eos=True, factor=1.0, cache="dual"),
}
DEMO_REGIONS = (8, 32)
WIDE = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0)
SMALL = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0)
# bd3lm: a block-diffusion model of the same shape decoding the same length with the same steps per block (its
# cache is exact; its window is one block, or two at a block's first step)
RANDOM_MODES = ("baseline", "prefix", "dual", "bd3lm")


@pytest.fixture(scope="module")
def checkpoints():
    return {region: demo_checkpoint(harness.BENCH / "results" / "cache", region) for region in DEMO_REGIONS}


@pytest.mark.parametrize("mode", list(DEMO_MODES))
@pytest.mark.parametrize("region", DEMO_REGIONS)
def test_demo_decode(benchmark, record_figure, region, mode, checkpoints):
    name = f"decode-demo{region}-{mode}"
    base = f"decode-demo{region}-baseline"
    spec = dict(builder="bench.decode_cases:demo_decode", checkpoint=str(checkpoints[region]), examples=100, cpus=1,
                warmup=1, sampler=dict(DEMO_MODES[mode], max_new_tokens=region))
    res = harness.measure(benchmark, name, spec, rounds=3, group=f"decode demo, {region}-token region")
    assert res["compiles_during_rounds"] == 0, "decoding recompiled between rounds"
    tag = "" if region == 32 else f"_{region}"
    figs = harness.FigureList()
    figs.add(f"decode_exact_match_{mode}{tag}", res["last"]["exact_match"], "", f"held-out exact match, {res['sampler']}")
    figs.add(f"decode_tokens_per_s_{mode}{tag}", res["last"]["answer_tokens"] / harness.case_time(name), "tokens/s",
             "answer tokens (before the stop) / round time")
    if mode != "baseline":
        figs.add(f"decode_speedup_{mode}{tag}", harness.ratio(base, name), "x",
                 "round time, baseline sampler / this mode (same prompts)")
    if mode == list(DEMO_MODES)[-1] and base in harness.CASES:
        base_em = harness.CASES[base]["last"]["exact_match"]
        em = {m: harness.CASES[f"decode-demo{region}-{m}"]["last"]["exact_match"] for m in DEMO_MODES
              if m != "baseline" and f"decode-demo{region}-{m}" in harness.CASES}
        kept = [m for m in em if base_em - em[m] <= 0.02]
        best = max(kept, key=lambda m: harness.ratio(base, f"decode-demo{region}-{m}"), default=None)
        if best is not None:
            figs.add(f"decode_speedup_vs_baseline{tag}", harness.ratio(base, f"decode-demo{region}-{best}"), "x",
                     f"best mode within 2 points of exact match: {best}")
            figs.add(f"decode_exact_match_drop_points{tag}", 100 * (base_em - em[best]), "points",
                     f"baseline exact match {base_em:.2f} minus {best}'s")
    record_figure.many(figs)


# bd3lm (issue 20): the demo trained with the block-diffusion objective (blocks of 4 and 8) against the demo's
# mdlm checkpoint, each with the default sampler (threshold 0.9, stop at the end of the answer) over the same
# region (the demo's 8 tokens; and 32, each model trained with answers padded to 32): time per answer token,
# and exact match. name -> (region, training overrides).
BD_OBJECTIVES = {"mdlm": (8, ()),
                 "bd3lm-b4": (8, ("diffusion.objective=bd3lm", "diffusion.block_size=4")),
                 "bd3lm-b8": (8, ("diffusion.objective=bd3lm", "diffusion.block_size=8")),
                 "mdlm-r32": (32, ()),
                 "bd3lm-b4-r32": (32, ("diffusion.objective=bd3lm", "diffusion.block_size=4"))}


@pytest.mark.parametrize("objective", list(BD_OBJECTIVES))
def test_block_diffusion_decode(benchmark, record_figure, objective):
    region, extra = BD_OBJECTIVES[objective]
    out = demo_checkpoint(harness.BENCH / "results" / "cache", region, extra=extra)
    name = f"decode-objective-{objective}"
    sampler = dict(max_new_tokens=region, threshold=0.9, stop_at_eos=True, cache="none", block_length=None,
                   steps=None)
    spec = dict(builder="bench.decode_cases:demo_decode", checkpoint=str(out), examples=100, cpus=1, warmup=1,
                sampler=sampler)
    res = harness.measure(benchmark, name, spec, rounds=3, group=f"decode by objective, {region}-token region")
    assert res["compiles_during_rounds"] == 0, "decoding recompiled between rounds"
    per_token = harness.case_time(name) / max(res["last"]["answer_tokens"], 1)
    figs = harness.FigureList()
    key = objective.replace("-", "_")
    figs.add(f"decode_exact_match_{key}", res["last"]["exact_match"], "", "held-out exact match, default sampler")
    figs.add(f"decode_s_per_token_{key}", per_token, "s/token", "round time / answer tokens (before the stop)")
    base = "decode-objective-mdlm" + ("" if region == 8 else f"-r{region}")
    if not objective.startswith("mdlm") and base in harness.CASES:
        base_per_token = harness.case_time(base) / max(harness.CASES[base]["last"]["answer_tokens"], 1)
        figs.add(f"decode_speedup_per_token_{key}", base_per_token / per_token, "x",
                 f"mdlm's time per answer token / this objective's (same {region}-token region, same sampler)")
    record_figure.many(figs)


@pytest.mark.parametrize("mode", [pytest.param(m, marks=[pytest.mark.fast] if m != "prefix" else [])
                                  for m in RANDOM_MODES])
def test_random_model_decode(benchmark, record_figure, mode):
    fast = harness.is_fast()
    label = "small" if fast else "0p6b_width"
    sampler = dict(max_new_tokens=64, steps=64, block_length=16) if fast else \
        dict(max_new_tokens=256, steps=128, block_length=32)
    sampler.update(cache=mode if mode in ("prefix", "dual") else "none", stop_at_eos=False)
    name = f"decode-random-{label}-{mode}"
    spec = dict(builder="bench.decode_cases:random_decode", config=SMALL if fast else WIDE, cpus=1,
                objective="bd3lm" if mode == "bd3lm" else "mdlm",
                rows=4 if fast else 1, prompt_len=16 if fast else 32, sampler=sampler,
                warmup=1 if fast else 0)
    res = harness.measure(benchmark, name, spec, rounds=3 if fast else 1, group=f"decode random {label}")
    assert res["compiles_during_rounds"] == 0, "decoding recompiled between rounds"
    base = f"decode-random-{label}-baseline"
    if mode != "baseline" and base in harness.CASES:
        tokens = sampler["max_new_tokens"] * spec["rows"]
        record_figure.many([
            (f"decode_speedup_{mode}{'' if mode == 'bd3lm' else '_cache'}_{label}", harness.ratio(base, name), "x",
             f"{tokens} tokens in {sampler['steps']} steps, blocks of {sampler['block_length']}: baseline / {mode}"),
            (f"decode_tokens_per_s_{mode}{'' if mode == 'bd3lm' else '_cache'}_{label}", tokens / harness.case_time(name),
             "tokens/s", "")])
