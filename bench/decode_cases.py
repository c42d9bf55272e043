"""Decoding cases (bench/test_bench_decode.py): one round = one sampler configuration over a fixed set
of prompts, in a case process of its own (bench/harness.py).

* `demo_decode`: the demo checkpoint (qwen3-tiny trained on the bundled tasks) over its held-out
  examples, scored by exact match as train.evaluate scores them.
* `random_decode`: a randomly initialised model of a given width and depth over random prompts, for
  speed alone (a random model is never confident, so only the cache can speed it up).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.cases import Case
from bench.harness import ROOT, wait_device

# The demo run as `make demo` trains it, without its own exact-match passes (the bench scores it). The
# answers are padded to the region the sampler fills (data.sft.pad_response_to = generation.max_new_tokens):
# the demo's 8, or 32 for the longer region (a model trained on 8-token regions does not know where to end
# a longer one).
def demo_overrides(region: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [f"generation.max_new_tokens={region}", "generation.eval_exact_match_examples=0", *extra]


def demo_checkpoint(cache_root: Path, region: int, log=print, extra: tuple[str, ...] = ()) -> Path:
    """The demo run's output_dir for answer regions of `region` tokens (plus `extra` overrides, e.g. the
    bd3lm objective), trained once and kept under `cache_root`, keyed by the resolved training config
    without its sampler settings (delete the folder to retrain with changed code)."""
    import json

    from omegaconf import OmegaConf

    from train.config import load_config

    resolved = OmegaConf.to_container(load_config(demo_overrides(region, extra)), resolve=True)
    resolved.pop("generation")  # how it decodes is not how it trains (the region reaches data.sft)
    resolved.pop("output_dir", None)
    key = hashlib.sha1(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = cache_root / f"demo{region}-{key}"
    if not (out / "checkpoints" / "latest").is_file():
        log(f"training the demo checkpoint into {out} (about 3 minutes; cached for later runs)")
        subprocess.run([sys.executable, "-m", "train.run", f"output_dir={out}", *demo_overrides(region, extra)], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
    return out


def _sampler(spec: dict, base):
    from dataclasses import replace

    return replace(base, **spec["sampler"])


def demo_decode(spec: dict, device) -> Case:
    from data import load_eval_examples
    from train.evaluate import exact_match
    from train.generate import load_for_inference
    from train.build import autocast_context

    loaded = load_for_inference(spec["checkpoint"], device)
    examples = load_eval_examples(loaded.cfg.data, loaded.tokenizer, max_examples=int(spec["examples"]))
    cfg = _sampler(spec, loaded.generation)

    def step():
        stats: dict = {}
        accuracy, _ = exact_match(loaded.model, loaded.tokenizer, examples, cfg, device,
                                  diffusion=loaded.diffusion, autocast=lambda: autocast_context(loaded.cfg),
                                  stats=stats)
        wait_device()
        return {"exact_match": accuracy, **{k: stats[k] for k in ("answer_tokens", "full_steps", "window_steps")}}

    info = {"suite": "decode", "model": "demo", "examples": len(examples), "sampler": cfg.describe(),
            "max_new_tokens": cfg.max_new_tokens}
    return Case(step, info)


def random_decode(spec: dict, device) -> Case:
    import torch

    from model.config import Qwen3Config
    from model.qwen3 import Qwen3ForDiffusionLM
    from train import runtime
    from train.block_decode import generate_ids_blockwise
    from train.generate import GenerationConfig, generate_ids

    torch.manual_seed(0)
    config = Qwen3Config(**spec["config"])
    bd3lm = spec.get("objective") == "bd3lm"  # block diffusion: blocks of the sampler's block_length
    model = Qwen3ForDiffusionLM(config, attention_kernel=spec.get("kernel", "pallas"),
                                loss_kernel=spec.get("kernel", "pallas"), block_diffusion=bd3lm).to(device)
    runtime.sync()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size - 1, size=int(spec["prompt_len"])).tolist()
               for _ in range(int(spec["rows"]))]
    cfg = GenerationConfig(**spec["sampler"])
    mask_id = config.vocab_size - 1

    def step():
        stats: dict = {}
        if bd3lm:
            generate_ids_blockwise(model, prompts, cfg, block_size=cfg.block, mask_id=mask_id, pad_id=0,
                                   shift_logits=True, device=device, stats=stats)
        else:
            generate_ids(model, prompts, cfg, mask_id=mask_id, pad_id=0, device=device, stats=stats)
        wait_device()
        return stats

    info = {"suite": "decode", "model": "random", "hidden_size": config.hidden_size,
            "layers": config.num_hidden_layers, "vocab_size": config.vocab_size, "rows": len(prompts),
            "prompt_len": int(spec["prompt_len"]), "sampler": cfg.describe(), "max_new_tokens": cfg.max_new_tokens}
    return Case(step, info)
