"""Shaping into fixed-shape rows: the batch contract, segments = whole examples (never split unless
truncated), positions restarting per segment, padding = segment 0, over-length handling, pretraining cuts."""

import json
from pathlib import Path

import numpy as np
import pytest

from data import build_batch_stream, build_eval_batches, load_tokenizer, render_example, to_messages
from data.config import normalize


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def alpaca_records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = "q" * int(rng.integers(1, 16))
        a = f"{i}:" + "a" * int(rng.integers(1, 10))
        out.append({"instruction": q, "input": "", "output": a})
    return out


def segments(batch, b):
    seg = batch["segment_ids"][b]
    return [np.flatnonzero(seg == k) for k in range(1, seg.max() + 1)]


def check_row_contract(batch, b, pad_id):
    seg, pos = batch["segment_ids"][b], batch["position_ids"][b]
    src, ids = batch["src_mask"][b], batch["input_ids"][b]
    real = seg > 0
    # padding only after the real tokens; segment ids 1..k, each one contiguous run
    n_real = int(real.sum())
    assert real[:n_real].all() and not real[n_real:].any()
    assert (np.diff(seg[:n_real]) >= 0).all() and (np.diff(seg[:n_real]) <= 1).all()
    if n_real:
        assert seg[0] == 1
    for idx in segments(batch, b):
        assert (idx == np.arange(idx[0], idx[0] + len(idx))).all()
        assert (pos[idx] == np.arange(len(idx))).all()  # positions restart at 0 per example
    assert (pos[~real] == 0).all() and src[~real].all() and (ids[~real] == pad_id).all()
    # attention allowed only within a segment: the mask is block-diagonal over the segments
    allowed = (seg[:, None] == seg[None, :]) & real[:, None]
    for idx in segments(batch, b):
        assert allowed[idx[0]].sum() == len(idx) and allowed[idx[0], idx].all()


def test_batch_contract_dtypes_and_shapes(tok):
    s = build_batch_stream(None, tok, training_mode="sft", batch_size=3, seed=0)
    batch = next(s)
    assert set(batch) == {"input_ids", "src_mask", "segment_ids", "position_ids"}
    for k, dt in [("input_ids", np.int32), ("src_mask", np.bool_), ("segment_ids", np.int32),
                  ("position_ids", np.int32)]:
        assert batch[k].dtype == dt and batch[k].shape == (3, 128), k
    maskable = (~batch["src_mask"]) & (batch["segment_ids"] > 0)
    assert maskable.any() and (batch["input_ids"] < tok.vocab_size).all()


@pytest.mark.parametrize("padding", ["pack", "pad"])
def test_epoch_rows_hold_every_example_once_and_whole(tmp_path, tok, padding):
    records = alpaca_records(60)
    cfg = {"dataset_name": write_jsonl(tmp_path / "a.jsonl", records), "block_size": 128, "padding": padding,
           "eval_examples": 0}
    s = build_batch_stream(cfg, tok, training_mode="sft", batch_size=4, seed=3)
    sft = normalize(cfg)["sft"]
    rendered = {}
    for r in records:
        ex = render_example(to_messages(r, "alpaca", sft), tok, sft)
        rendered[tuple(ex.ids)] = ex.src
    n_rows = s.summary["rows_per_epoch"]
    seen = []
    rows_done = 0
    while rows_done < n_rows:
        batch = next(s)
        for b in range(4):
            if rows_done == n_rows:
                break
            rows_done += 1
            check_row_contract(batch, b, tok.pad_id)
            segs = segments(batch, b)
            if padding == "pad":
                assert len(segs) == 1
            for idx in segs:
                key = tuple(batch["input_ids"][b, idx].tolist())
                assert key in rendered  # a whole example, never a piece
                assert list(batch["src_mask"][b, idx]) == rendered[key]
                seen.append(key)
    assert sorted(seen) == sorted(rendered)  # each example exactly once per epoch
    if padding == "pack":
        assert s.summary["examples_per_row"] > 1.5


def test_packing_beats_padding_on_bundled_data(tok):
    shares = {p: build_batch_stream({"padding": p}, tok, training_mode="sft", batch_size=8, seed=0)
              .summary["padding_share"] for p in ("pack", "pad")}
    assert shares["pack"] < 0.25 < 0.5 < shares["pad"]


def test_overlength_truncate_and_drop(tmp_path, tok):
    records = [
        {"instruction": "short", "input": "", "output": "ok"},
        {"instruction": "q", "input": "", "output": "x" * 200},       # response too long: truncated
        {"instruction": "p" * 200, "input": "", "output": "y"},       # prompt alone too long: dropped
    ]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    cfg = {"dataset_name": path, "block_size": 48, "eval_examples": 0, "padding": "pad"}
    s = build_batch_stream(cfg, tok, training_mode="sft", batch_size=2, seed=0)
    assert (s.summary["truncated"], s.summary["dropped"], s.summary["examples"]) == (1, 1, 2)
    batch = next(s)
    lengths = sorted((batch["segment_ids"] > 0).sum(axis=1).tolist())
    assert lengths[1] == 48
    full = int(np.argmax((batch["segment_ids"] > 0).sum(axis=1)))
    text = tok.decode(batch["input_ids"][full])
    assert text.startswith("<|im_start|>user\nq<|im_end|>") and text.endswith("xxx")  # cut from the end
    assert (~batch["src_mask"][full]).sum() > 0
    s = build_batch_stream(dict(cfg, sft={"overlength": "drop"}), tok, training_mode="sft", batch_size=2, seed=0)
    assert (s.summary["truncated"], s.summary["dropped"], s.summary["examples"]) == (0, 2, 1)
    assert "dropped 2" in s.format_summary()


@pytest.mark.parametrize("padding", ["pack", "pad"])
def test_pretraining_rows(tmp_path, tok, padding):
    docs = [{"text": f"doc{i} " + "w" * (5 + 17 * i)} for i in range(8)]
    cfg = {"dataset_name": write_jsonl(tmp_path / "p.jsonl", docs), "block_size": 32, "padding": padding,
           "eval_examples": 0, "shuffle": False}
    s = build_batch_stream(cfg, tok, training_mode="pretrain", batch_size=1, seed=0)
    stream_tokens = []
    for _ in range(s.summary["rows_per_epoch"]):
        batch = next(s)
        check_row_contract(batch, 0, tok.pad_id)
        real = batch["segment_ids"][0] > 0
        assert not batch["src_mask"][0][real].any()  # every real token may be noised
        if padding == "pad":  # a row never starts mid-way into a second document
            assert batch["segment_ids"][0].max() == 1
        for idx in segments(batch, 0):
            stream_tokens.append(batch["input_ids"][0, idx].tolist())
    flat = [t for piece in stream_tokens for t in piece]
    expected = [t for d in docs for t in tok.encode(d["text"]) + [tok.eos_id]]
    assert flat == expected  # documents in order, each followed by EOS, nothing lost or duplicated
    if padding == "pack":
        assert s.summary["padding_share"] < 32 / sum(len(tok.encode(d["text"])) + 1 for d in docs) + 1e-9


def test_eval_batches_static_shape_and_complete(tok):
    batches = build_eval_batches(None, tok, training_mode="sft", batch_size=16)
    assert all(b["input_ids"].shape == (16, 128) for b in batches)
    n_examples = sum(int(b["segment_ids"][i].max()) for b in batches for i in range(16))
    assert n_examples == 200  # the bundled alpaca held-out file, every example once
    last = batches[-1]
    empty = last["segment_ids"].max(axis=1) == 0
    assert empty.any() and last["src_mask"][empty].all()  # filled with all-padding rows
    again = build_eval_batches(None, tok, training_mode="sft", batch_size=16)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(batches, again))


def test_pretraining_eval_batches_use_bundled_heldout(tok):
    batches = build_eval_batches({"dataset_name": "bundled:pretrain/train.jsonl"}, tok, training_mode="pretrain",
                                 batch_size=8)
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    heldout = (Path(__file__).resolve().parents[1] / "data/bundled/pretrain/heldout.jsonl").read_text().splitlines()
    assert real == sum(len(tok.encode(json.loads(x)["text"])) + 1 for x in heldout)
    assert all(not b["src_mask"][b["segment_ids"] > 0].any() for b in batches)


@pytest.mark.parametrize("template", ["qwen3", "separator"])
def test_pad_response_to_appends_maskable_eos_to_the_final_response(tmp_path, tok, template):
    records = [
        {"instruction": "Reverse: abc", "input": "", "output": "cba"},  # 3 + end token: padded to 10
        {"instruction": "q", "input": "", "output": "x" * 30},           # already longer: unchanged
        {"instruction": "p" * 30, "input": "", "output": "yy"},          # padding stops at block_size
    ]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    base = {"dataset_name": path, "block_size": 60, "eval_examples": 0, "padding": "pad", "shuffle": False,
            "sft": {"template": template}}
    plain = build_batch_stream(base, tok, training_mode="sft", batch_size=3, seed=0)
    padded = build_batch_stream(dict(base, sft={"template": template, "pad_response_to": 10}), tok,
                                training_mode="sft", batch_size=3, seed=0)
    a, b = next(plain), next(padded)
    eos, end = tok.eos_id, tok.im_end_id if template == "qwen3" else tok.eos_id
    pad_counts = []
    for row in range(3):
        ids_a = a["input_ids"][row][a["segment_ids"][row] > 0].tolist()
        ids_b = b["input_ids"][row][b["segment_ids"][row] > 0].tolist()
        resp_a = np.flatnonzero(~a["src_mask"][row] & (a["segment_ids"][row] > 0))
        resp_b = np.flatnonzero(~b["src_mask"][row] & (b["segment_ids"][row] > 0))
        # the prompt and the response up to its end token are untouched
        assert ids_b[:resp_a[-1] + 1] == ids_a[:resp_a[-1] + 1] and ids_b[resp_a[-1]] == end
        extra = len(resp_b) - len(resp_a)
        pad_counts.append(extra)
        # padding is EOS, maskable, ends the example (qwen3's newline after the turn goes), and the
        # response reaches 10 tokens unless it was longer or the row is full
        if extra:
            assert ids_b[resp_a[-1] + 1:] == [eos] * extra
            assert resp_b[-1] == len(ids_b) - 1
        else:
            assert ids_b == ids_a
        assert len(resp_b) >= 10 or len(ids_b) == 60
    assert pad_counts[0] == 10 - 4 and pad_counts[1] == 0 and 0 < pad_counts[2] < 8
    assert padded.summary["response_pad_tokens"] == sum(pad_counts)
    assert f"padded with {sum(pad_counts)} maskable EOS" in padded.format_summary()
    assert plain.summary["response_pad_tokens"] == 0
    with pytest.raises(ValueError, match="pad_response_to"):
        build_batch_stream(dict(base, sft={"pad_response_to": -1}), tok, training_mode="sft", batch_size=3, seed=0)
