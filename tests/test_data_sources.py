"""Sources (file types, folders, fsspec URLs, HF names), mixing proportions, determinism, exact resume,
data-parallel shares, held-out splits, and the bundled files / Hydra defaults."""

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from data import (DEFAULTS, DataError, build_batch_stream, build_eval_batches, load_eval_examples,
                  load_tokenizer, render_example, to_messages)
from data.config import normalize
from data.synthetic import generate
from data.sources import BUNDLED_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


def alpaca(tag, n):
    return [{"instruction": f"{tag} q{i}", "input": "", "output": f"{tag}{i}"} for i in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def row_tags(batch, tok):
    """Per row (pad mode: one example), the assistant answer text."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        maskable = (~batch["src_mask"][b]) & (batch["segment_ids"][b] > 0)
        out.append(tok.decode(batch["input_ids"][b][maskable], skip_special_tokens=True))
    return out


def all_equal(a, b):
    return all((a[k] == b[k]).all() for k in a)


# ----------------------------------------------------------------------------------------- file types

def test_file_types_and_folder(tmp_path, tok):
    recs = alpaca("x", 6)
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", recs[:2])
    (tmp_path / "d" / "b.json").write_text(json.dumps(recs[2:4]))
    with open(tmp_path / "d" / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(recs[4:5])
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(recs[5:6]), tmp_path / "d" / "e.parquet")
    (tmp_path / "d" / "notes.md").write_text("ignored")
    s = build_batch_stream({"dataset_name": str(tmp_path / "d"), "eval_examples": 0, "padding": "pad",
                            "shuffle": False}, tok, training_mode="sft", batch_size=6, seed=0)
    assert s.summary["examples"] == 6
    assert row_tags(next(s), tok) == [r["output"] for r in recs]  # files in sorted order, records in order


def test_sharegpt_parquet_and_csv_json_cells(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    conv = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                               {"from": "human", "value": "again"}, {"from": "gpt", "value": "sure"}]}]
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "c.parquet")
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["conversations"])
        w.writeheader()
        w.writerow({"conversations": json.dumps(conv[0]["conversations"])})
    for name in ("c.parquet", "c.csv"):
        s = build_batch_stream({"dataset_name": str(tmp_path / name), "eval_examples": 0,
                                "sft": {"format": "sharegpt"}}, tok, training_mode="sft", batch_size=1, seed=0)
        b = next(s)
        maskable = (~b["src_mask"][0]) & (b["segment_ids"][0] > 0)
        assert tok.decode(b["input_ids"][0][maskable]) == "yo<|im_end|>sure<|im_end|>"


def test_fsspec_url_folder(tok):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    try:
        with fs.open("/pallas_test/part-0.jsonl", "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in alpaca("m", 3)))
        with fs.open("/pallas_test/part-1.jsonl", "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in alpaca("n", 2)))
        s = build_batch_stream({"dataset_name": "memory://pallas_test", "eval_examples": 0, "padding": "pad",
                                "shuffle": False}, tok, training_mode="sft", batch_size=5, seed=0)
        assert row_tags(next(s), tok) == ["m0", "m1", "m2", "n0", "n1"]
    finally:
        fs.rm("/pallas_test", recursive=True)


def test_gcs_without_gcsfs_is_a_clear_error(tok, monkeypatch):
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs installed: the missing-package error cannot happen")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="gcsfs") as info:
        build_batch_stream({"dataset_name": "gs://bucket/data.jsonl"}, tok, training_mode="sft", batch_size=1,
                           seed=0)
    assert isinstance(info.value, DataError) and "gs://bucket/data.jsonl" in str(info.value)


def test_hugging_face_name_goes_through_datasets(monkeypatch, tok):
    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(name, split):
        calls.append((name, split))
        return alpaca(split, 4)

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    s = build_batch_stream({"dataset_name": "someone/instructions", "eval_dataset_name": "someone/instructions@test",
                            "padding": "pad", "shuffle": False}, tok, training_mode="sft", batch_size=4, seed=0)
    assert row_tags(next(s), tok) == ["train0", "train1", "train2", "train3"]
    assert calls == [("someone/instructions", "train")]
    assert [ref for _, ref in load_eval_examples({"dataset_name": "someone/instructions",
                                                  "eval_dataset_name": "someone/instructions@test"}, tok)] == \
        ["test0", "test1", "test2", "test3"]


# ---------------------------------------------------------------------------------------------- mixing

def test_mixing_proportions(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca("a", 100))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca("b", 30))
    cfg = {"dataset_name": [a, b], "weights": [1, 3], "padding": "pad", "eval_examples": 0}
    s = build_batch_stream(cfg, tok, training_mode="sft", batch_size=26, seed=7)
    assert s.summary["epoch_counts"] == {a: 33, b: 97}  # 32.5 / 97.5: the tie goes to the first source
    tags = [t for _ in range(20) for t in row_tags(next(s), tok)]  # 520 rows = 4 epochs of 130
    share_b = np.mean([t.startswith("b") for t in tags])
    assert abs(share_b - 0.75) < 0.01
    # proportions hold locally too (shuffled interleaving, not blocks): every window of 52 rows
    windows = [np.mean([t.startswith("b") for t in tags[i:i + 52]]) for i in range(0, 520, 52)]
    assert min(windows) > 0.55 and max(windows) < 0.95
    # the small source cycles through all of its examples, reshuffled per pass
    counts = {t: tags.count(t) for t in set(tags) if t.startswith("b")}
    assert len(counts) == 30 and max(counts.values()) - min(counts.values()) <= 1


def test_no_weights_means_size_proportional(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca("a", 40))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca("b", 10))
    s = build_batch_stream({"dataset_name": [a, b], "eval_examples": 0}, tok, training_mode="sft",
                           batch_size=2, seed=0)
    assert s.summary["epoch_counts"] == {a: 40, b: 10}
    assert "mixing per epoch" in s.format_summary()


# ------------------------------------------------------------------------------- determinism and resume

def test_deterministic_and_reshuffled(tok, tmp_path):
    cfg = {"dataset_name": write_jsonl(tmp_path / "a.jsonl", alpaca("d", 40)), "padding": "pad", "eval_examples": 0}

    def mk(seed):
        return build_batch_stream(cfg, tok, training_mode="sft", batch_size=8, seed=seed)

    s1, s2, s3 = mk(1), mk(1), mk(2)
    first = [next(s1) for _ in range(3)]
    assert all(all_equal(x, next(s2)) for x in first)
    assert not all_equal(first[0], next(s3))
    # each epoch (40 rows = 5 batches) is a different order of the same examples
    s = mk(1)
    tags0 = [t for _ in range(5) for t in row_tags(next(s), tok)]
    tags1 = [t for _ in range(5) for t in row_tags(next(s), tok)]
    assert sorted(tags0) == sorted(tags1) == sorted(f"d{i}" for i in range(40)) and tags0 != tags1
    # shuffle=false: file order, every epoch
    s = build_batch_stream(dict(cfg, shuffle=False), tok, training_mode="sft", batch_size=40, seed=1)
    assert row_tags(next(s), tok) == row_tags(next(s), tok) == [f"d{i}" for i in range(40)]


@pytest.mark.parametrize("padding", ["pack", "pad"])
def test_resume_sees_the_same_batches(tok, padding, tmp_path):
    cfg = {"dataset_name": write_jsonl(tmp_path / "a.jsonl", alpaca("r", 37)), "padding": padding,
           "eval_examples": 0}
    s = build_batch_stream(cfg, tok, training_mode="sft", batch_size=5, seed=11)
    for _ in range(6):
        next(s)
    state = json.loads(json.dumps(s.state_dict()))
    resumed = build_batch_stream(cfg, tok, training_mode="sft", batch_size=5, seed=11)
    resumed.load_state_dict(state)
    for _ in range(12):  # crosses epoch boundaries
        assert all_equal(next(s), next(resumed))


def test_pretrain_resume(tok):
    cfg = {"dataset_name": "bundled:pretrain/train.jsonl", "block_size": 64}
    s = build_batch_stream(cfg, tok, training_mode="pretrain", batch_size=4, seed=0)
    for _ in range(3):
        next(s)
    r = build_batch_stream(cfg, tok, training_mode="pretrain", batch_size=4, seed=0)
    r.load_state_dict(s.state_dict())
    assert all(all_equal(next(s), next(r)) for _ in range(3))


def test_ranks_read_disjoint_shares(tok):
    cfg = {"padding": "pad"}
    whole = build_batch_stream(cfg, tok, training_mode="sft", batch_size=6, seed=5)
    ranks = [build_batch_stream(cfg, tok, training_mode="sft", batch_size=2, seed=5, rank=r, world_size=3)
             for r in range(3)]
    for _ in range(4):
        full = next(whole)
        parts = [next(r) for r in ranks]
        for k in full:
            assert (np.concatenate([p[k] for p in parts]) == full[k]).all()
    tags = [row_tags(p, tok) for p in parts]
    assert not (set(tags[0]) & set(tags[1])) and not (set(tags[1]) & set(tags[2]))
    # the saved position is in global rows: a 3-rank run resumes on 1 rank at the same place
    single = build_batch_stream(cfg, tok, training_mode="sft", batch_size=6, seed=5)
    single.load_state_dict(ranks[0].state_dict())
    assert all_equal(next(single), next(whole))


# ------------------------------------------------------------------------------------- held-out splits

def test_heldout_taken_from_training_source(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca("h", 200))
    cfg = {"dataset_name": path, "eval_examples": 10, "padding": "pad"}
    s = build_batch_stream(cfg, tok, training_mode="sft", batch_size=190, seed=0)
    train = set(row_tags(next(s), tok))
    held = [ref for _, ref in load_eval_examples(cfg, tok)]
    assert len(train) == 190 and len(held) == 10 and not (train & set(held))
    assert held == [ref for _, ref in load_eval_examples(cfg, tok)]  # stable
    batches = build_eval_batches(cfg, tok, training_mode="sft", batch_size=4)
    assert sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches) == 10
    assert build_eval_batches(dict(cfg, eval_examples=0), tok, training_mode="sft", batch_size=4) == []


def test_eval_examples_prompt_and_reference(tok):
    examples = load_eval_examples(None, tok)
    assert len(examples) == 200
    prompt, ref = examples[0]
    assert tok.decode(prompt).startswith("<|im_start|>user\n")
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert 2 <= len(ref) <= 8
    multi = load_eval_examples({"dataset_name": "bundled:sharegpt/train.jsonl", "sft": {"format": "sharegpt"}},
                               tok, max_examples=50)
    assert len(multi) == 50 and any(tok.decode(p).count("<|im_start|>user") == 2 for p, _ in multi)


# ------------------------------------------------------------------------------------ bundled + config

def test_bundled_files_equal_a_fresh_generation():
    files = generate()
    shipped = {str(p.relative_to(BUNDLED_DIR)) for p in BUNDLED_DIR.rglob("*") if p.is_file()}
    assert shipped == set(files)
    for rel, text in files.items():
        assert (BUNDLED_DIR / rel).read_text(encoding="utf-8") == text, rel
    assert sum(len(t.encode()) for t in files.values()) < 700_000


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages"])
def test_bundled_examples_are_short_and_split_disjoint(tok, fmt):
    ext = "json" if fmt == "alpaca" else "jsonl"
    sft = normalize({"sft": {"format": fmt}})["sft"]
    prompts = {}
    for split in ("train", "heldout"):
        s = build_batch_stream({"dataset_name": f"bundled:{fmt}/{split}.{ext}", "sft": {"format": fmt}}, tok,
                               training_mode="sft", batch_size=1, seed=0)
        assert s.summary["truncated"] == s.summary["dropped"] == 0
        text = (BUNDLED_DIR / fmt / f"{split}.{ext}").read_text()
        records = json.loads(text) if ext == "json" else [json.loads(x) for x in text.splitlines()]
        prompts[split] = set()
        for r in records:
            msgs = to_messages(r, fmt, sft)
            ids = render_example(msgs, tok, sft).ids
            answers = [m["content"] for m in msgs if m["role"] == "assistant"]
            assert all(2 <= len(a) <= 8 for a in answers)
            single = len(answers) == 1 and not any(m["role"] == "system" for m in msgs)
            assert len(ids) <= (56 if single else 128)
            prompts[split] |= {m["content"] for m in msgs if m["role"] == "user"}
    if fmt == "alpaca":
        assert len(prompts["heldout"]) == 200
    assert not prompts["train"] & prompts["heldout"]


def test_hydra_yaml_matches_defaults():
    sft = yaml.safe_load((REPO / "train/configs/data/sft.yaml").read_text())
    # two deliberate differences: the CLI pads responses to the sampler's region (plain use pads nothing),
    # and the CLI picks the template from the tokenizer (auto; plain use renders Qwen3's unless told)
    assert sft["sft"].pop("pad_response_to") == "${generation.max_new_tokens}"
    assert DEFAULTS["sft"]["pad_response_to"] == 0
    assert sft["sft"].pop("template") == "auto" and DEFAULTS["sft"]["template"] == "qwen3"
    plain = {k: v for k, v in DEFAULTS["sft"].items() if k not in ("pad_response_to", "template")}
    assert sft == {**DEFAULTS, "sft": plain}
    # pretrain.yaml inherits sft.yaml through Hydra's defaults list; compare what Hydra composes.
    from omegaconf import OmegaConf

    from train.config import load_config

    pre = OmegaConf.to_container(load_config(["data=pretrain", "training_mode=pretrain"]).data, resolve=True)
    assert pre == dict(DEFAULTS, dataset_name="bundled:pretrain/train.jsonl",
                       sft=dict(DEFAULTS["sft"], pad_response_to=8, template="auto"))
