"""Bad input: every error names the file, the record and the field; `on_error=skip` skips exactly the bad
records and reports each; invalid settings stop with one line naming the key and the allowed values."""

import json

import pytest

from data import DataError, build_batch_stream, load_eval_examples, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


GOOD = {"instruction": "q", "input": "", "output": "a"}


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def build(tok, path, fmt="alpaca", training_mode="sft", **cfg):
    return build_batch_stream({"dataset_name": path, "eval_examples": 0, "sft": {"format": fmt}, **cfg}, tok,
                              training_mode=training_mode, batch_size=1, seed=0)


def raises(tok, path, fmt="alpaca", training_mode="sft", **cfg):
    with pytest.raises(DataError) as info:
        build(tok, path, fmt, training_mode, **cfg)
    return str(info.value)


@pytest.mark.parametrize("fmt,bad,locator,field,problem", [
    ("alpaca", '{"instruction": "q", "output": ', "line 2", None, "malformed JSON"),
    ("alpaca", {"instruction": "q", "input": ""}, "line 2", "field 'output'", "missing"),
    ("alpaca", {"instruction": "q", "output": 5}, "line 2", "field 'output'", "expected a string, got int"),
    ("alpaca", {"instruction": ["q"], "output": "a"}, "line 2", "field 'instruction'", "expected a string"),
    ("alpaca", {"instruction": "q", "output": "  "}, "line 2", "field 'output'", "empty assistant turn"),
    ("alpaca", ["not", "an", "object"], "line 2", None, "expected an object"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     "line 2", "field 'conversations[1].value'", "empty assistant turn"),
    ("sharegpt", {"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "line 2", "field 'conversations[0].from'", "unknown role 'robot'"),
    ("sharegpt", {"conversations": "oops"}, "line 2", "field 'conversations'", "not valid JSON"),
    ("sharegpt", {"messages": []}, "line 2", "field 'conversations'", "missing"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}]}, "line 2", "field 'conversations'",
     "no assistant turn"),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     "line 2", "field 'messages[1].role'", "unknown role 'bot'"),
    ("messages", {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     "line 2", "field 'messages[0].content'", "expected a string, got int"),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
     "line 2", "field 'messages[1].content'", "missing"),
    ("custom", {"question": "q"}, "line 2", "field 'answer'", "missing"),
])
def test_bad_record_message_names_file_record_field(tmp_path, tok, fmt, bad, locator, field, problem):
    good = {"alpaca": GOOD, "custom": {"question": "q", "answer": "a"},
            "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}}[fmt]
    path = write_lines(tmp_path / "bad.jsonl", [good, bad, good])
    cfg = {"sft": {"format": fmt, "custom_format": {"instruction_field": "question", "response_field": "answer"}}}
    with pytest.raises(DataError) as info:
        build_batch_stream({"dataset_name": path, "eval_examples": 0, **cfg}, tok, training_mode="sft",
                           batch_size=1, seed=0)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert path in msg and locator in msg and problem in msg, msg
    if field:
        assert field in msg, msg
    assert "\n" not in msg


def test_json_list_errors(tmp_path, tok):
    path = tmp_path / "list.json"
    path.write_text('[\n {"instruction": "q", "output": "a"},\n {"instruction": "q" "output": "a"}\n]')
    msg = raises(tok, str(path))
    assert str(path) in msg and "line 3 column" in msg and "malformed JSON" in msg
    path.write_text(json.dumps([GOOD, GOOD, {"instruction": "q", "output": None}]))
    msg = raises(tok, str(path))
    assert "index 2" in msg and "field 'output'" in msg and "is null" in msg


def test_csv_error_names_line(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nq,,a\nq2,,\n")
    msg = raises(tok, str(path))
    assert str(path) in msg and "line 3" in msg and "field 'output'" in msg


def test_non_utf8_bytes_name_their_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    good = json.dumps(GOOD).encode() + b"\n"
    path.write_bytes(good * 2 + b'{"instruction": "caf\xe9", "output": "a"}\n' + good)
    msg = raises(tok, str(path))
    assert str(path) in msg and "not UTF-8 text: line 3, byte 21 of the line" in msg and "\n" not in msg


def test_skip_counts_and_reports_every_bad_record(tmp_path, tok):
    path = write_lines(tmp_path / "mixed.jsonl", [
        GOOD, "{broken", {"instruction": "q"}, GOOD, {"instruction": "q", "output": 1}, GOOD])
    s = build(tok, path, on_error="skip")
    assert s.summary["examples"] == 3 and s.summary["skipped"] == 3
    reported = s.summary["skipped_records"]
    assert len(reported) == 3
    for r, loc in zip(reported, ["line 2", "line 3", "line 5"]):
        assert r.startswith(f"{path}, {loc}")
    text = s.format_summary()
    assert "skipped 3" in text and all(r in text for r in reported)


def test_unknown_format_and_other_settings(tmp_path, tok):
    path = write_lines(tmp_path / "a.jsonl", [GOOD])
    cases = [
        ({"sft": {"format": "foo"}},
         "data.sft.format: unknown value 'foo'; allowed: alpaca, sharegpt, messages, custom"),
        ({"sft": {"template": "llama"}}, "data.sft.template: unknown value 'llama'; allowed: auto, qwen3, separator"),
        ({"padding": "ragged"}, "data.padding: unknown value 'ragged'; allowed: pack, pad"),
        ({"on_error": "ignore"}, "data.on_error: unknown value 'ignore'; allowed: raise, skip"),
        ({"sft": {"train_on": "all"}},
         "data.sft.train_on: unknown value 'all'; allowed: all_assistant, last_assistant"),
        ({"sft": {"overlength": "wrap"}}, "data.sft.overlength: unknown value 'wrap'; allowed: truncate, drop"),
        ({"block_size": 0}, "data.block_size: expected an integer >= 2"),
        ({"weights": [1, 2]}, "data.weights: expected 1 non-negative numbers"),
    ]
    for cfg, expected in cases:
        with pytest.raises(DataError if "unknown value" in expected else ValueError) as info:
            build_batch_stream({"dataset_name": path, **cfg}, tok, training_mode="sft", batch_size=1, seed=0)
        assert str(info.value).startswith(expected) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="^training_mode: unknown value 'rl'; allowed: sft, pretrain$"):
        build_batch_stream({"dataset_name": path}, tok, training_mode="rl", batch_size=1, seed=0)


def test_no_trainable_token(tmp_path, tok):
    path = write_lines(tmp_path / "long.jsonl", [{"instruction": "p" * 100, "output": "a"}] * 3)
    msg = raises(tok, path, block_size=32)
    assert path in msg and "no trainable token" in msg and "3 dropped" in msg
    msg = raises(tok, write_lines(tmp_path / "bad.jsonl", ["{", "{"]), on_error="skip")
    assert "no trainable token" in msg and "2 skipped" in msg


def test_missing_files_and_folders(tmp_path, tok):
    msg = raises(tok, str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in msg and "not found" in msg
    (tmp_path / "empty").mkdir()
    assert "holds no" in raises(tok, str(tmp_path / "empty"))
    assert "no such bundled file" in raises(tok, "bundled:alpaca/nope.json")
    (tmp_path / "x.xml").write_text("<a/>")
    assert "unsupported file type '.xml'" in raises(tok, str(tmp_path / "x.xml"))


def test_pretraining_text_field(tmp_path, tok):
    path = write_lines(tmp_path / "p.jsonl", [{"text": "fine"}, {"body": "no text"}, {"text": " ", "body": ""}])
    msg = raises(tok, path, training_mode="pretrain")
    assert path in msg and "line 2" in msg and "field 'text'" in msg
    s = build(tok, path, training_mode="pretrain", text_field="body", on_error="skip")
    assert (s.summary["examples"], s.summary["skipped"], s.summary["empty"]) == (1, 1, 1)
    assert "1 empty documents ignored" in s.format_summary()


def test_eval_examples_errors_name_the_record(tmp_path, tok):
    path = write_lines(tmp_path / "held.jsonl", [GOOD, {"instruction": "q", "output": ""}])
    with pytest.raises(DataError, match=r"held\.jsonl, line 2, field 'output': empty assistant turn"):
        load_eval_examples({"dataset_name": path, "eval_dataset_name": path}, tok)
    assert len(load_eval_examples({"dataset_name": path, "eval_dataset_name": path, "on_error": "skip"}, tok)) == 1


def test_json_file_variants(tmp_path, tok):
    # a .json file may hold JSON lines or one pretty-printed record
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    assert build(tok, str(lines)).summary["examples"] == 2
    single = tmp_path / "one.json"
    single.write_text(json.dumps(GOOD, indent=2))
    assert build(tok, str(single)).summary["examples"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "instruction": "q",\n  "output": \n}')
    msg = raises(tok, str(bad))
    assert str(bad) in msg and "line 4 column 1" in msg
