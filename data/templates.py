"""Chat templates: messages -> token ids + `src_mask`, and the generation prompt.

The rendering is tokenised piece by piece (special tokens inserted by id, each text piece encoded on its
own) and the pieces concatenated, so every token knows which span it came from: masks come from the
spans, never from re-tokenising substrings. `render_prompt` uses the same renderer, so a prompt for
generation is exactly the prefix of a training example up to its response content.

qwen3 (Qwen3's own chat template with thinking off):
    <|im_start|>{role}\\n{content}<|im_end|>\\n                    system / user turns
    <|im_start|>assistant\\n{content}<|im_end|>\\n                 every other assistant turn
    <|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n{content}<|im_end|>\\n   the final assistant turn
    <|im_start|>user\\n<tool_response>\\n{content}\\n</tool_response><|im_end|>\\n   tool results
separator (the seed's):  {system}\\n\\n{user}{separator}{assistant}<eos>{user}{separator}{assistant}<eos>
auto: qwen3 with Qwen3 / Hugging Face tokenizers; separator with "=" for the byte-level tokenizer.
Maskable (src_mask False): each trained assistant turn's content and its closing <|im_end|> (or EOS).
"""

from __future__ import annotations

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


def _render_qwen3(b: _Builder, msgs: Sequence[Mapping[str, Any]], trained: set[int]) -> None:
    tok, c = b.tok, b.const
    _require_chat_tokens(tok)
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    think = c.get("think")
    tool_open, tool_close = tok.special_ids.get("<tool_response>"), tok.special_ids.get("</tool_response>")
    n = len(msgs)
    for i, m in enumerate(msgs):
        role, content = m["role"], m["content"]
        if role == "assistant":
            b.add(c["assistant"])
            # Qwen3 (thinking off) gives the final assistant turn after the last user turn an empty
            # think block; it is part of the prompt.
            if think and i == n - 1 and i > last_user:
                b.add(think)
            start = b.position()
            train = i in trained
            b.add(tok.encode(content) + [tok.im_end_id], trainable=train)
            b.out.assistant_spans.append((start, b.position()))
            b.add(c["nl"])
        elif role == "tool":
            # Qwen3 wraps tool results in a user turn; consecutive results share one turn.
            if i == 0 or msgs[i - 1]["role"] != "tool":
                b.add(c["tool_head"])
            if tool_open is not None and tool_close is not None:
                b.add([*c["nl"], tool_open, *tok.encode(f"\n{content}\n"), tool_close])
            else:
                b.text(f"\n{content}")
            if i == n - 1 or msgs[i + 1]["role"] != "tool":
                b.add(c["end_nl"])
        else:  # system, user
            b.add([tok.im_start_id, *tok.encode(f"{role}\n{content}"), *c["end_nl"]])


def _render_separator(b: _Builder, msgs: Sequence[Mapping[str, Any]], trained: set[int], sep: str) -> None:
    # The seed's format: non-assistant messages joined by blank lines, then the separator, the answer
    # and EOS. The separator belongs to the assistant turn (as prompt), so a prompt ends with it.
    for i, m in enumerate(msgs):
        role, content = m["role"], m["content"]
        if role == "assistant":
            b.text(sep)
            start = b.position()
            b.add(b.tok.encode(content) + [b.tok.eos_id], trainable=i in trained)
            b.out.assistant_spans.append((start, b.position()))
        else:
            if i > 0 and msgs[i - 1]["role"] != "assistant":
                b.add(b.const["blank"])
            b.text(content)


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


def _render(tok: Tokenizer, msgs: Sequence[Mapping[str, Any]], sft: Mapping, trained: set[int]) -> _Builder:
    b = _Builder(tok)
    template, separator = resolve_template(sft, tok)
    if template == "qwen3":
        _render_qwen3(b, msgs, trained)
    else:
        _render_separator(b, msgs, trained, separator)
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
    return _render(tokenizer, msgs, sft, trained).out


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
    b = _render(tokenizer, msgs, sft, set())
    template, separator = resolve_template(sft, tokenizer)
    if template == "qwen3":
        _require_chat_tokens(tokenizer)
        b.add(b.const["assistant"])
        if "think" in b.const:
            b.add(b.const["think"])
    else:
        b.text(separator)
    return b.out.ids
