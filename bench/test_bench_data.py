"""Data pipeline: the trainer's data config (train/configs, bundled instruction data) with the Qwen3
tokenizer, to packed [rows, block_size] batches.

* tokenise + pack: read, render, tokenise and pack one epoch (examples/s, tokens/s);
* draw batches: assemble batches from the packed epoch (the per-step cost);
* padding share of pack vs pad (a layout figure, not a time), and the seed-style batches of
  bench/cases.py (one example per row, padded to the longest in the batch) built from packed ones.

In-process (no accelerator, no XLA): no per-case memory figure.

    pytest bench/test_bench_data.py --benchmark-only [--fast]
"""

from __future__ import annotations

import numpy as np
import pytest

from bench import harness
from bench.cases import count_examples, unpack_to_padded

ROWS = 16


@pytest.fixture(scope="module")
def data_cfg():
    from train.config import load_config

    return load_config(["tokenizer_name=qwen3"]).data


@pytest.fixture(scope="module")
def qwen3():
    from data import load_tokenizer

    return load_tokenizer("qwen3")


def build(cfg, tok, **changes):
    from omegaconf import OmegaConf

    from data import build_batch_stream

    cfg = OmegaConf.merge(cfg, changes) if changes else cfg
    return build_batch_stream(cfg, tok, training_mode="sft", batch_size=ROWS, seed=0)


@pytest.mark.fast
def test_tokenise_and_pack(benchmark, record_figure, data_cfg, qwen3):
    """One epoch of the bundled training data, read to packed rows."""
    rounds = 3 if harness.is_fast() else 5
    stream = benchmark.pedantic(build, args=(data_cfg, qwen3), rounds=rounds, iterations=1,
                                warmup_rounds=1)
    median = benchmark.stats.stats.median
    s = stream.summary
    assert s["examples"] > 0 and s["tokens"] > 0
    benchmark.extra_info.update(examples=s["examples"], tokens=s["tokens"], median_s=median)
    record_figure.many([
        ("data_tokens_per_s", s["tokens"] / median, "tok/s",
         f"read + render + tokenise (qwen3) + pack one epoch: {s['examples']} examples, "
         f"{s['tokens']} tokens, block {s['block_size']}"),
        ("data_examples_per_s", s["examples"] / median, "ex/s", "the same, in examples"),
    ])


@pytest.mark.fast
def test_draw_batches(benchmark, record_figure, data_cfg, qwen3):
    """Per-step cost: assembling ROWS x block_size batches from the packed epoch."""
    stream = build(data_cfg, qwen3)
    n = 20
    benchmark.pedantic(lambda: [next(stream) for _ in range(n)], rounds=5, iterations=1,
                       warmup_rounds=1)
    per_batch = benchmark.stats.stats.median / n
    record_figure("data_batch_ms", 1e3 * per_batch, "ms",
                  f"assemble one {ROWS}x{stream.block_size} batch from the packed epoch")


def test_padding_share_pack_vs_pad(benchmark, record_figure, data_cfg, qwen3):
    """Share of row slots that are padding at the trainer's block size, pack vs pad."""
    shares = {}

    def measure():
        for padding in ("pack", "pad"):
            shares[padding] = build(data_cfg, qwen3, padding=padding).summary["padding_share"]

    benchmark.pedantic(measure, rounds=1, iterations=1)
    assert shares["pack"] < shares["pad"]
    record_figure.many([
        ("data_padding_share_pack", shares["pack"], "", "padding share of row slots, packed rows"),
        ("data_padding_share_pad", shares["pad"], "", "padding share, one example per block_size row"),
    ])


@pytest.mark.fast
def test_seed_style_batches(benchmark, record_figure, data_cfg, qwen3):
    """The train-step suite's seed-style batches hold exactly the examples of the packed ones."""
    stream = build(data_cfg, qwen3)
    packed = [next(stream) for _ in range(8)]
    padded = benchmark.pedantic(lambda: [unpack_to_padded(b, qwen3.pad_id) for b in packed],
                                rounds=3, iterations=1)
    tokens = slots = 0
    for p, s in zip(packed, padded):
        real = s["segment_ids"] > 0
        assert count_examples(p) == s["input_ids"].shape[0] == count_examples(s)
        assert real.sum() == (p["segment_ids"] > 0).sum()
        assert real.sum(1).max() == s["input_ids"].shape[1]  # padded to the longest
        assert np.array_equal(np.sort(s["input_ids"][real]), np.sort(p["input_ids"][p["segment_ids"] > 0]))
        assert (s["src_mask"][~real]).all() and (s["position_ids"][real] == np.concatenate(
            [np.arange(n) for n in real.sum(1)])).all()
        tokens, slots = tokens + int(real.sum()), slots + real.size
    record_figure("seed_style_padding_share", 1 - tokens / slots, "",
                  "padding share of seed-style batches (one example per row, padded to the longest)")
