"""Dataset records -> one list of chat messages `[{"role", "content"}]`.

Roles are normalised to system / user / assistant / tool. Every problem raises `DataError` naming the
field (the caller adds the file and record); nothing is silently dropped here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .errors import DataError

ROLES = ("system", "user", "assistant", "tool")

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool",
}
# OpenAI style; "developer" is the newer OpenAI name of the system role, "function" the older tool role.
MESSAGES_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                  "tool": "tool", "function": "tool"}

Message = dict[str, str]


def _field(record: Mapping, name: str, *, required: bool = True, allow_empty: bool = True) -> str | None:
    """A string field; None/absent -> None when optional."""
    if not isinstance(record, Mapping):
        raise DataError(f"expected an object (mapping of fields), got {type(record).__name__}")
    value = record.get(name)
    if value is None:
        if required:
            raise DataError("missing" if name not in record else "is null", field=name)
        return None
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__} {_short(value)}", field=name)
    if not allow_empty and not value.strip():
        raise DataError("is empty", field=name)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _list_field(record: Mapping, name: str) -> list:
    if not isinstance(record, Mapping):
        raise DataError(f"expected an object (mapping of fields), got {type(record).__name__}")
    if name not in record or record[name] is None:
        raise DataError("missing", field=name)
    value = record[name]
    if isinstance(value, str):  # CSV cells (and some parquet exports) hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"expected a list of turns; the string is not valid JSON ({e.msg})", field=name) from None
    if hasattr(value, "tolist") and not isinstance(value, list):  # numpy arrays from parquet readers
        value = value.tolist()
    if not isinstance(value, list):
        raise DataError(f"expected a list of turns, got {type(value).__name__}", field=name)
    if not value:
        raise DataError("is an empty list", field=name)
    return value


def _content(value: Any, field: str) -> str:
    # OpenAI content may be a list of parts; only text parts make sense for a text model.
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise DataError(f"content part {j} is not a text part ({_short(part)})", field=field)
        return "".join(texts)
    if value is None:
        raise DataError("missing", field=field)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__} {_short(value)}", field=field)
    return value


def _check_turns(messages: list[Message], field_of) -> list[Message]:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn: nothing to train on", field=field_of(None))
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError("empty assistant turn", field=field_of(i))
    return messages


def from_alpaca(record: Mapping) -> list[Message]:
    instruction = _field(record, "instruction")
    inp = _field(record, "input", required=False) or ""
    output = _field(record, "output")
    system = _field(record, "system", required=False)
    if not instruction.strip() and not inp.strip():
        raise DataError("is empty (and so is input)", field="instruction")
    if not output.strip():
        raise DataError("empty assistant turn", field="output")
    # The seed dropped `input`; Alpaca's own prompt puts it after the instruction, a blank line between.
    if not inp.strip():
        user = instruction
    elif not instruction.strip():
        user = inp
    else:
        user = f"{instruction}\n\n{inp}"
    out: list[Message] = []
    if system and system.strip():
        out.append({"role": "system", "content": system})
    out += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return out


def _role_turns(record: Mapping, list_field: str, role_key: str, content_key: str,
                roles: Mapping[str, str]) -> list[Message]:
    """A list of {role_key, content_key} objects -> messages; errors name e.g. conversations[3].from."""
    out: list[Message] = []
    for i, turn in enumerate(_list_field(record, list_field)):
        where = f"{list_field}[{i}]"
        if not isinstance(turn, Mapping):
            raise DataError(f"expected an object with '{role_key}' and '{content_key}', got {type(turn).__name__}",
                            field=where)
        who = turn.get(role_key)
        if not isinstance(who, str):
            raise DataError("missing" if who is None else f"expected a string, got {type(who).__name__}",
                            field=f"{where}.{role_key}")
        role = roles.get(who.strip().lower())
        if role is None:
            raise DataError(f"unknown role {who!r}; allowed: {', '.join(roles)}", field=f"{where}.{role_key}")
        out.append({"role": role, "content": _content(turn.get(content_key), f"{where}.{content_key}")})
    return out


def from_sharegpt(record: Mapping) -> list[Message]:
    out = _role_turns(record, "conversations", "from", "value", SHAREGPT_ROLES)
    # A top-level system prompt is common in ShareGPT exports.
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system})
        offset = 1
    else:
        offset = 0
    return _check_turns(out, lambda i: "conversations" if i is None else f"conversations[{i - offset}].value")


def from_messages(record: Mapping) -> list[Message]:
    out = _role_turns(record, "messages", "role", "content", MESSAGES_ROLES)
    return _check_turns(out, lambda i: "messages" if i is None else f"messages[{i}].content")


def from_custom(record: Mapping, instruction_field: str, response_field: str,
                system_field: str | None) -> list[Message]:
    instruction = _field(record, instruction_field, allow_empty=False)
    response = _field(record, response_field)
    if not response.strip():
        raise DataError("empty assistant turn", field=response_field)
    out: list[Message] = []
    if system_field:
        system = _field(record, system_field, required=False)
        if system and system.strip():
            out.append({"role": "system", "content": system})
    out += [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
    return out


def to_messages(record: Any, fmt: str, sft_cfg: Mapping) -> list[Message]:
    """One dataset record in format `fmt` -> normalised messages (DataError on bad input)."""
    if fmt == "alpaca":
        return from_alpaca(record)
    if fmt == "sharegpt":
        return from_sharegpt(record)
    if fmt == "messages":
        return from_messages(record)
    if fmt == "custom":
        c = sft_cfg["custom_format"]
        return from_custom(record, c["instruction_field"], c["response_field"], c.get("system_field"))
    raise DataError(f"data.sft.format: unknown value {fmt!r}; allowed: alpaca, sharegpt, messages, custom")


def to_text(record: Any, text_field: str) -> str:
    """A pretraining record -> its document text (possibly empty; the caller counts those)."""
    return _field(record, text_field)
