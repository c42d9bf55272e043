"""Chat templates: messages -> token ids + `src_mask`, and the generation prompt.

The rendering is tokenised piece by piece (special tokens inserted by id, the text between two of them
encoded as one piece, as Hugging Face's tokenizer encodes a rendered template, except where a span
starts: after "assistant\\n" and after a think block) and the pieces concatenated, so every token knows
which span it came from: masks come from the spans, never from re-tokenising substrings. `render_prompt`
uses the same renderer, so a prompt for generation is exactly the prefix of a training example up to its
response content.

qwen3 (Qwen3's own chat template with thinking off):
    <|im_start|>{role}\\n{content}<|im_end|>\\n                    system / user turns
    <|im_start|>assistant\\n{content}{calls}<|im_end|>\\n          every other assistant turn
    <|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n{content}{calls}<|im_end|>\\n
        the final assistant turn, when it comes after the last user query (tool results are no query)
    <|im_start|>user\\n<tool_response>\\n{content}\\n</tool_response><|im_end|>\\n   tool results
        (consecutive results share one user turn, joined by \\n)
    {calls}: each tool call as \\n<tool_call>\\n{"name": "...", "arguments": {...}}\\n</tool_call>
        (no \\n before the first when the content is empty)
    tools: the system turn becomes <|im_start|>system\\n{system content}\\n\\n# Tools ... <tools>
        one JSON schema a line </tools> ...<|im_end|>\\n (without "{system content}\\n\\n" when the
        conversation does not open with a system message)
separator (the seed's):  {system}\\n\\n{user}{separator}{assistant}<eos>{user}{separator}{assistant}<eos>
    tools: <tools>\\n{one JSON schema a line}\\n</tools> as a prompt piece after the leading system
    message; tool calls as in qwen3 after the content; tool results as <tool_response>\\n{content}\\n
    </tool_response> prompt pieces.
auto: qwen3 with Qwen3 / Hugging Face tokenizers; separator with "=" for the byte-level tokenizer.
<tool_call>, </tool_call>, <tool_response>, </tool_response> are inserted by id where the tokenizer has
them (qwen3 and byte do), as text otherwise; the same strings inside message content always stay text.
Maskable (src_mask False): each trained assistant turn's content, its tool calls and its closing
<|im_end|> (or EOS). Tool results, the tools block, think blocks and all template tokens are prompt.
Tools travel as a `tools` list on any message (formats put the record's on the first one), so they
survive `include_system_prompt: false`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import sft_section
from .tokenizer import Tokenizer


@dataclass
class Rendered:
    ids: list[int] = field(default_factory=list)
    src: list[bool] = field(default_factory=list)  # True = never noised (prompt, template tokens)
    # [start, end) of each assistant turn's content + end token, trained or not, in order
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_maskable(self) -> int:
        return len(self.src) - sum(self.src)


class _Builder:
    """Accumulates pieces. Constant pieces (template tokens) are built once per tokenizer and cached on it."""

    __slots__ = ("tok", "const", "ids", "src", "out")

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.const = _consts(tok)
        self.out = Rendered()
        self.ids, self.src = self.out.ids, self.out.src

    def add(self, ids: list[int], *, trainable: bool = False) -> None:
        self.ids += ids
        self.src += [not trainable] * len(ids)

    def text(self, s: str, *, trainable: bool = False) -> None:
        if s:
            self.add(self.tok.encode(s), trainable=trainable)

    def parts(self, parts: Sequence[int | str], *, trainable: bool = False) -> None:
        """Token ids (ints) and text (strs); adjacent texts are joined and encoded as one piece."""
        ids: list[int] = []
        run: list[str] = []
        for p in parts:
            if isinstance(p, str):
                run.append(p)
                continue
            if run:
                ids += self.tok.encode("".join(run))
                run = []
            ids.append(p)
        if run:
            ids += self.tok.encode("".join(run))
        self.add(ids, trainable=trainable)

    def position(self) -> int:
        return len(self.ids)


def _consts(tok: Tokenizer) -> dict[str, list[int]]:
    cache = tok.__dict__.get("_template_pieces")
    if cache is None:
        enc = tok.encode
        cache = {"nl": enc("\n"), "blank": enc("\n\n")}
        if tok.im_start_id is not None and tok.im_end_id is not None:
            cache["assistant"] = [tok.im_start_id, *enc("assistant\n")]
            cache["end_nl"] = [tok.im_end_id, *cache["nl"]]
            cache["tool_head"] = [tok.im_start_id, *enc("user")]
        if tok.think_id is not None and tok.end_think_id is not None:
            cache["think"] = [tok.think_id, *cache["blank"], tok.end_think_id, *cache["blank"]]
        tok.__dict__["_template_pieces"] = cache
    return cache


def _require_chat_tokens(tok: Tokenizer) -> None:
    if tok.im_start_id is None or tok.im_end_id is None:
        raise ValueError(f"data.sft.template: 'qwen3' needs <|im_start|> and <|im_end|>, which tokenizer "
                         f"'{tok.name}' lacks; use data.sft.template=separator")


def _visible(messages: Sequence[Mapping[str, Any]], sft: Mapping) -> list[Mapping[str, Any]]:
    if sft["include_system_prompt"]:
        return list(messages)
    return [m for m in messages if m["role"] != "system"]


def _tools_of(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The conversation's tool schemas: the first non-empty `tools` list any message carries."""
    for m in messages:
        tools = m.get("tools")
        if tools:
            return list(tools)
    return []


def _marker(tok: Tokenizer, name: str) -> int | str:
    """A tool marker (`<tool_call>` ...) as its id, or as text where the tokenizer lacks it."""
    return tok.special_ids.get(name, name)


# Qwen3's chat template: the system text announcing the tools, around the schemas (one JSON a line).
QWEN3_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")


def _qwen3_tools_parts(tok: Tokenizer, tools: Sequence[Any]) -> list[int | str]:
    call, end_call = _marker(tok, "<tool_call>"), _marker(tok, "</tool_call>")
    return [QWEN3_TOOLS_INTRO, *("\n" + json.dumps(t, ensure_ascii=False) for t in tools),
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within ",
            call, end_call, " XML tags:\n", call, '\n{"name": <function-name>, "arguments": <args-json-object>}\n',
            end_call]


def _calls_parts(tok: Tokenizer, m: Mapping[str, Any], content: str) -> list[int | str]:
    """An assistant message's tool calls as Qwen3 writes them after the content. Takes the normalised
    {name, arguments} and OpenAI's {"function": {...}}; `arguments` text is written verbatim."""
    out: list[int | str] = []
    for j, call in enumerate(m.get("tool_calls") or ()):
        fn = call.get("function") or call
        args = fn["arguments"]
        if j > 0 or content:
            out.append("\n")
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        out += [_marker(tok, "<tool_call>"), f'\n{{"name": "{fn["name"]}", "arguments": {args}}}\n',
                _marker(tok, "</tool_call>")]
    return out


def _last_query(msgs: Sequence[Mapping[str, Any]]) -> int:
    """Index of the last user message that is not a tool result in disguise; len - 1 when none (as in
    Qwen3's template: then no assistant turn gets a think block)."""
    for i in range(len(msgs) - 1, -1, -1):
        content = msgs[i].get("content") or ""
        if msgs[i]["role"] == "user" and not (content.startswith("<tool_response>")
                                              and content.endswith("</tool_response>")):
            return i
    return len(msgs) - 1


def _render_qwen3(b: _Builder, msgs: Sequence[Mapping[str, Any]], trained: set[int], tools: Sequence[Any]) -> None:
    tok, c = b.tok, b.const
    _require_chat_tokens(tok)
    last_query = _last_query(msgs)
    think = c.get("think")
    n = len(msgs)
    merged_system = bool(tools) and n > 0 and msgs[0]["role"] == "system"
    if tools:
        # Qwen3 announces the tools in the system turn, after the conversation's opening system message.
        head = [(msgs[0].get("content") or "") + "\n\n"] if merged_system else []
        b.parts([tok.im_start_id, "system\n", *head, *_qwen3_tools_parts(tok, tools), *c["end_nl"]])
    for i, m in enumerate(msgs):
        role = m["role"]
        content = m.get("content") or ""
        if role == "assistant":
            b.add(c["assistant"])
            shown = content
            # Qwen3 (thinking off) gives the final assistant turn after the last user query an empty
            # think block (prompt) and strips the newlines that open its content.
            if think and i == n - 1 and i > last_query:
                b.add(think)
                shown = content.lstrip("\n")
            start = b.position()
            b.parts([shown, *_calls_parts(tok, m, content), tok.im_end_id], trainable=i in trained)
            b.out.assistant_spans.append((start, b.position()))
            b.add(c["nl"])
        elif role == "tool":
            # Qwen3 wraps tool results in a user turn; consecutive results share one turn.
            parts: list[int | str] = []
            if i == 0 or msgs[i - 1]["role"] != "tool":
                parts += [tok.im_start_id, "user"]
            parts += ["\n", _marker(tok, "<tool_response>"), f"\n{content}\n", _marker(tok, "</tool_response>")]
            if i == n - 1 or msgs[i + 1]["role"] != "tool":
                parts += c["end_nl"]
            b.parts(parts)
        elif i == 0 and merged_system:
            continue
        else:  # system, user
            b.add([tok.im_start_id, *tok.encode(f"{role}\n{content}"), *c["end_nl"]])


def _render_separator(b: _Builder, msgs: Sequence[Mapping[str, Any]], trained: set[int], sep: str,
                      tools: Sequence[Any]) -> None:
    # The seed's format: non-assistant messages joined by blank lines, then the separator, the answer
    # and EOS. The separator belongs to the assistant turn (as prompt), so a prompt ends with it.
    tok = b.tok
    joined = False  # whether the next prompt piece follows another one (and so a blank line)

    def prompt_piece(parts: list[int | str]) -> None:
        nonlocal joined
        if joined:
            b.add(b.const["blank"])
        b.parts(parts)
        joined = True

    # Tools: one prompt piece after the leading system message (or first of all), as Qwen3 places them.
    tools_at = 1 if msgs and msgs[0]["role"] == "system" else 0
    tools_text = "<tools>\n" + "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools) + "</tools>"
    for i, m in enumerate(msgs):
        if tools and i == tools_at:
            prompt_piece([tools_text])
        role, content = m["role"], m.get("content") or ""
        if role == "assistant":
            b.text(sep)
            start = b.position()
            b.parts([content, *_calls_parts(tok, m, content), tok.eos_id], trainable=i in trained)
            b.out.assistant_spans.append((start, b.position()))
            joined = False
        elif role == "tool":
            prompt_piece([_marker(tok, "<tool_response>"), f"\n{content}\n", _marker(tok, "</tool_response>")])
        else:
            prompt_piece([content])
    if tools and tools_at >= len(msgs):
        prompt_piece([tools_text])


# template=auto with the byte-level tokenizer: the separator format as `prompt=answer<eos>`. A model trained
# from scratch has no chat format to keep, and Qwen3's template would make each short example ~2.4x longer.
BYTE_TOKENIZER_SEPARATOR = "="


def resolve_template(sft: Mapping, tok: Tokenizer) -> tuple[str, str]:
    """(template, separator) that `sft` renders with `tok`: `auto` is `qwen3` for Qwen3 (and other
    Hugging Face) tokenizers and `separator` with BYTE_TOKENIZER_SEPARATOR for the byte-level one."""
    template, separator = sft["template"], sft["instruction_response_separator"]
    if template == "auto":
        if tok.name == "byte":
            return "separator", BYTE_TOKENIZER_SEPARATOR
        return "qwen3", separator
    if template not in ("qwen3", "separator"):
        raise ValueError(f"data.sft.template: unknown value {template!r}; allowed: auto, qwen3, separator")
    return template, separator


def _render(tok: Tokenizer, msgs: Sequence[Mapping[str, Any]], sft: Mapping, trained: set[int],
            tools: Sequence[Any]) -> _Builder:
    b = _Builder(tok)
    template, separator = resolve_template(sft, tok)
    if template == "qwen3":
        _render_qwen3(b, msgs, trained, tools)
    else:
        _render_separator(b, msgs, trained, separator, tools)
    return b


def render_example(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, sft_cfg: Any) -> Rendered:
    """A training example: ids, src mask (True = prompt/template) and the assistant spans.

    Messages after the last assistant turn carry no training signal and, with bidirectional attention,
    would let the responses see a later turn, so they are left out.
    """
    sft = sft_section(sft_cfg)
    msgs = _visible(messages, sft)
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if not assistant:
        return Rendered()
    msgs = msgs[: assistant[-1] + 1]
    trained = set(assistant) if sft["train_on"] == "all_assistant" else {assistant[-1]}
    return _render(tokenizer, msgs, sft, trained, _tools_of(messages)).out


def pad_final_response(r: Rendered, target: int, pad_id: int, max_length: int) -> Rendered:
    """Extend the final assistant turn with maskable `pad_id` (EOS) tokens until its response (content and
    end token) is `target` tokens long, as LLaDA-style SFT does: the sampler fills a fixed region of
    `generation.max_new_tokens` masks, and a model that never saw EOS after an answer fills it with text.

    The padding replaces what the template puts after the final turn (qwen3: a newline), so the padded
    response ends the example, as the generation region ends the sampler's input. Never grows the example
    past `max_length` (the block size). Returns `r` itself when nothing is added.
    """
    if target <= 0 or not r.assistant_spans:
        return r
    start, end = r.assistant_spans[-1]
    extra = min(target - (end - start), max_length - end)
    if extra <= 0:
        return r
    out = Rendered(ids=r.ids[:end] + [pad_id] * extra, src=r.src[:end] + [False] * extra,
                   assistant_spans=r.assistant_spans[:-1] + [(start, end + extra)])
    return out


def render_prompt(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, sft_cfg: Any) -> list[int]:
    """Token ids of a generation prompt: the conversation so far, ending exactly where the next
    assistant turn's content starts (qwen3: `...<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`)."""
    sft = sft_section(sft_cfg)
    msgs = _visible(messages, sft)
    b = _render(tokenizer, msgs, sft, set(), _tools_of(messages))
    template, separator = resolve_template(sft, tokenizer)
    if template == "qwen3":
        _require_chat_tokens(tokenizer)
        b.add(b.const["assistant"])
        if "think" in b.const:
            b.add(b.const["think"])
    else:
        b.text(separator)
    return b.out.ids
