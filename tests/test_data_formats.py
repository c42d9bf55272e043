"""Formats -> messages -> rendered ids + masks. The maskable spans of every rendered example, decoded, are
exactly the assistant contents followed by their end token, in every format and template, multi-turn
included; the generation prompt is exactly the training example's prefix."""

import pytest

from data import load_tokenizer, render_example, render_prompt, to_messages
from data.config import normalize

TOKENIZERS = ["byte", "qwen3"]

RECORDS = {
    "alpaca": [
        {"instruction": "Reverse: abcde", "input": "", "output": "edcba"},
        {"instruction": "Add the numbers.", "input": "12+30", "output": "42", "system": "Be terse."},
    ],
    "sharegpt": [
        {"conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "Sort: dcba"}, {"from": "gpt", "value": "abcd"},
            {"from": "user", "value": "And upper?"}, {"from": "model", "value": "ABCD"},
            {"from": "human", "value": "Thanks. Reverse: xyz"}, {"from": "assistant", "value": "zyx"}]},
        {"conversations": [
            {"from": "human", "value": "What's the weather?"},
            {"from": "gpt", "value": "<tool_call>weather()</tool_call>"},
            {"from": "observation", "value": "sunny"}, {"from": "function", "value": "22C"},
            {"from": "gpt", "value": "Sunny, 22 degrees."}]},
    ],
    "messages": [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Привет 😀"},
                      {"role": "assistant", "content": "Здравствуйте!"},
                      {"role": "user", "content": [{"type": "text", "text": "2+2="}]},
                      {"role": "assistant", "content": "4"}]},
    ],
    "custom": [{"q": "Upper: abc", "a": "ABC", "sys": "System here."}],
}


def sft_cfg(fmt, **over):
    cfg = {"format": fmt, "custom_format": {"instruction_field": "q", "response_field": "a", "system_field": "sys"}}
    cfg.update(over)
    return normalize({"sft": cfg})["sft"]


def maskable_spans(r):
    spans, start = [], None
    for i, s in enumerate(r.src + [True]):
        if not s and start is None:
            start = i
        elif s and start is not None:
            spans.append((start, i))
            start = None
    return spans


def assistant_contents(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("template", ["qwen3", "separator"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_maskable_spans_are_assistant_contents(fmt, template, tok_name):
    tok = load_tokenizer(tok_name)
    end = "<|im_end|>" if template == "qwen3" else "<|endoftext|>"
    sft = sft_cfg(fmt, template=template)
    for record in RECORDS[fmt]:
        messages = to_messages(record, fmt, sft)
        r = render_example(messages, tok, sft)
        decoded = [tok.decode(r.ids[a:b]) for a, b in maskable_spans(r)]
        assert decoded == [c + end for c in assistant_contents(messages)]
        assert [tuple(s) for s in r.assistant_spans] == maskable_spans(r)
        # the prompt for the last turn is exactly the example's prefix up to the answer
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        assert render_prompt(messages[:last], tok, sft) == r.ids[: r.assistant_spans[-1][0]]


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_last_assistant_only(tok_name):
    tok = load_tokenizer(tok_name)
    sft = sft_cfg("sharegpt", train_on="last_assistant")
    messages = to_messages(RECORDS["sharegpt"][0], "sharegpt", sft)
    r = render_example(messages, tok, sft)
    assert [tok.decode(r.ids[a:b]) for a, b in maskable_spans(r)] == ["zyx<|im_end|>"]
    assert len(r.assistant_spans) == 3


def test_qwen3_rendering_matches_qwen3_chat_template():
    tok = load_tokenizer("byte")
    sft = sft_cfg("sharegpt")
    r = render_example(to_messages(RECORDS["sharegpt"][0], "sharegpt", sft), tok, sft)
    assert tok.decode(r.ids) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nSort: dcba<|im_end|>\n<|im_start|>assistant\nabcd<|im_end|>\n"
        "<|im_start|>user\nAnd upper?<|im_end|>\n<|im_start|>assistant\nABCD<|im_end|>\n"
        "<|im_start|>user\nThanks. Reverse: xyz<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nzyx<|im_end|>\n")
    # tool results: one user turn wrapping consecutive results; think block only on the final turn
    r = render_example(to_messages(RECORDS["sharegpt"][1], "sharegpt", sft), tok, sft)
    assert tok.decode(r.ids) == (
        "<|im_start|>user\nWhat's the weather?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>weather()</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nSunny, 22 degrees.<|im_end|>\n")
    assert tok.token_id("<tool_response>") in r.ids  # inserted as the special token, by id
    assert tok.token_id("<tool_call>") not in r.ids  # ...while the same string in content stays text


def test_template_special_tokens_are_single_ids_and_prompt_only():
    tok = load_tokenizer("qwen3")
    sft = sft_cfg("alpaca")
    r = render_example(to_messages(RECORDS["alpaca"][0], "alpaca", sft), tok, sft)
    think = r.ids.index(tok.think_id)
    assert r.ids[think:think + 4] == [tok.think_id, *tok.encode("\n\n"), tok.end_think_id, *tok.encode("\n\n")][:4]
    assert all(r.src[: r.assistant_spans[0][0]])  # template and empty think block are prompt
    assert r.ids[-2:] == [tok.im_end_id, *tok.encode("\n")] and r.src[-1] and not r.src[-2]
    prompt = render_prompt([{"role": "user", "content": "Reverse: abcde"}], tok, sft)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_separator_template_text():
    tok = load_tokenizer("byte")
    sft = sft_cfg("alpaca", template="separator", instruction_response_separator="\n### A:\n")
    r = render_example(to_messages(RECORDS["alpaca"][1], "alpaca", sft), tok, sft)
    assert tok.decode(r.ids) == "Be terse.\n\nAdd the numbers.\n\n12+30\n### A:\n42<|endoftext|>"
    assert tok.decode(render_prompt([{"role": "user", "content": "hi"}], tok, sft)) == "hi\n### A:\n"


def test_auto_template_is_qwen3_for_qwen3_tokenizers_and_compact_for_bytes():
    sft = sft_cfg("alpaca", template="auto")
    messages = to_messages(RECORDS["alpaca"][1], "alpaca", sft)
    byte = load_tokenizer("byte")
    assert byte.decode(render_example(messages, byte, sft).ids) == \
        "Be terse.\n\nAdd the numbers.\n\n12+30=42<|endoftext|>"
    assert byte.decode(render_prompt(messages[:2], byte, sft)) == "Be terse.\n\nAdd the numbers.\n\n12+30="
    qwen3 = load_tokenizer("qwen3")
    assert (render_example(messages, qwen3, sft).ids
            == render_example(messages, qwen3, sft_cfg("alpaca", template="qwen3")).ids)
    with pytest.raises(ValueError, match="allowed: auto, qwen3, separator"):
        sft_cfg("alpaca", template="chatml")


def test_alpaca_input_joined_and_system():
    sft = sft_cfg("alpaca")
    assert to_messages(RECORDS["alpaca"][1], "alpaca", sft) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Add the numbers.\n\n12+30"},
        {"role": "assistant", "content": "42"}]
    assert to_messages({"instruction": "", "input": "only input", "output": "x"}, "alpaca", sft)[0] == \
        {"role": "user", "content": "only input"}
    assert to_messages({"instruction": "no input key", "output": "x"}, "alpaca", sft)[0]["content"] == "no input key"


def test_role_normalisation():
    sft = sft_cfg("sharegpt")
    roles = [m["role"] for m in to_messages(RECORDS["sharegpt"][1], "sharegpt", sft)]
    assert roles == ["user", "assistant", "tool", "tool", "assistant"]
    rec = {"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}, {"role": "function", "content": "f"},
                        {"role": "assistant", "content": "b"}]}
    assert [m["role"] for m in to_messages(rec, "messages", sft)] == ["system", "user", "assistant", "tool",
                                                                      "assistant"]


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "custom"])
def test_include_system_prompt_false_drops_system(fmt):
    tok = load_tokenizer("byte")
    on, off = sft_cfg(fmt), sft_cfg(fmt, include_system_prompt=False)
    record = RECORDS[fmt][-1] if fmt != "sharegpt" else RECORDS[fmt][0]
    messages = to_messages(record, fmt, on)
    assert any(m["role"] == "system" for m in messages)
    with_sys, without = render_example(messages, tok, on), render_example(messages, tok, off)
    assert "<|im_start|>system" in tok.decode(with_sys.ids)
    assert "system" not in tok.decode(without.ids)
    assert len(without.assistant_spans) == len(with_sys.assistant_spans)
    prompt = render_prompt(messages[:1] + [{"role": "user", "content": "q"}], tok, off)
    assert "system" not in tok.decode(prompt)


def test_trailing_user_turn_not_rendered_for_training():
    tok = load_tokenizer("byte")
    sft = sft_cfg("messages")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "later"}]
    r = render_example(msgs, tok, sft)
    assert "later" not in tok.decode(r.ids)
    assert tok.decode(r.ids).endswith("<think>\n\n</think>\n\nb<|im_end|>\n")
