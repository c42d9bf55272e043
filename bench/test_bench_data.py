"""Data pipeline throughput: tokenise + pack the bundled instruction data with the Qwen3 tokenizer
(examples/s, tokens/s), the per-step cost of drawing a batch, and the padding share of pack vs pad.

Run: pytest bench/test_bench_data.py --benchmark-only   (figures also written to bench/results/data.json)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data import build_batch_stream, load_tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "data.json"
BATCH = 32


def record(section: str, values: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[section] = values
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer("qwen3")


def build(tok, **cfg):
    return build_batch_stream(cfg or None, tok, training_mode="sft", batch_size=BATCH, seed=0)


def test_tokenise_and_pack(benchmark, qwen3):
    """Read, render, tokenise and pack one epoch of bundled/alpaca/train.json (4,000 examples)."""
    stream = benchmark.pedantic(build, args=(qwen3,), rounds=5, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    s = stream.summary
    figures = {
        "tokenizer": "qwen3", "examples": s["examples"], "tokens": s["tokens"], "block_size": s["block_size"],
        "median_s": median, "examples_per_s": s["examples"] / median, "tokens_per_s": s["tokens"] / median,
    }
    benchmark.extra_info.update(figures)
    record("tokenise_pack", figures)
    assert s["examples"] == 4000 and s["tokens"] > 0


def test_draw_batches(benchmark, qwen3):
    """Per-step cost: assembling BATCH x 128 batches from the packed epoch (tokenised once)."""
    stream = build(qwen3)
    n = 20
    benchmark.pedantic(lambda: [next(stream) for _ in range(n)], rounds=5, iterations=1, warmup_rounds=1)
    per_batch = benchmark.stats.stats.median / n
    figures = {"batch_size": BATCH, "block_size": 128, "ms_per_batch": 1e3 * per_batch,
               "rows_per_s": BATCH / per_batch}
    benchmark.extra_info.update(figures)
    record("draw_batches", figures)


def test_padding_share_pack_vs_pad(benchmark, qwen3):
    """Share of row slots that are padding, bundled alpaca train, pack vs pad (a layout figure, not a time)."""
    byte = load_tokenizer("byte")
    shares = {}

    def measure():
        for tok in (qwen3, byte):
            for L in (128, 512):
                for padding in ("pack", "pad"):
                    s = build(tok, block_size=L, padding=padding).summary
                    shares[f"{tok.name}/L{L}/{padding}"] = {
                        "padding_share": round(s["padding_share"], 4), "rows": s["rows_per_epoch"],
                        "examples_per_row": round(s["examples_per_row"], 3)}

    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v["padding_share"] for k, v in shares.items()})
    record("padding_share", shares)
    for tok in ("qwen3", "byte"):
        for L in (128, 512):
            assert shares[f"{tok}/L{L}/pack"]["padding_share"] < shares[f"{tok}/L{L}/pad"]["padding_share"]
