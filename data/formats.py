"""Dataset records -> one list of chat messages `[{"role", "content"}]`.

Roles are normalised to system / user / assistant / tool. Every problem raises `DataError` naming the
field (the caller adds the file and record); nothing is silently dropped here.

Tool calling (sharegpt and messages) adds optional keys; every message keeps `role` and `content`:
    assistant  "tool_calls": [{"name": str, "arguments": dict | str, "id"?: str}]  (content may be "")
    tool       "name", "tool_call_id" when the record gives them (Qwen3's template shows neither)
    first      "tools": [{"type": "function", "function": {...}}]  the record's tool schemas
`arguments` stays as given: a dict, or JSON text checked to hold an object (rendered verbatim, as Qwen3's
template does). Bare function schemas in `tools` are wrapped in the OpenAI form, as LLaMA-Factory does.
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
    "function_call": "assistant",  # LLaMA-Factory: an assistant turn whose value is the tool call(s)
}
# OpenAI style; "developer" is the newer OpenAI name of the system role, "function" the older tool role.
MESSAGES_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                  "tool": "tool", "function": "tool"}

Message = dict[str, Any]


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
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
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
                roles: Mapping[str, str], convert=None) -> list[Message]:
    """A list of {role_key, content_key} objects -> messages; errors name e.g. conversations[3].from.
    `convert(turn, who, role, where)` builds a message where the plain {role, content} does not do."""
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
        message = convert(turn, who.strip().lower(), role, where) if convert else None
        out.append(message or {"role": role, "content": _content(turn.get(content_key), f"{where}.{content_key}")})
    return out


def _json_text(value: str, expected: str, field: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"expected {expected}; the string is not valid JSON ({e.msg})", field=field) from None


def _check_json(value: Any, field: str) -> None:
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise DataError(f"cannot be written as JSON ({e})", field=field) from None


def _name(fn: Mapping, field: str, what: str) -> str:
    name = fn.get("name")
    if name is None:
        raise DataError(f"missing: {what} needs the function's name", field=field)
    if not isinstance(name, str):
        raise DataError(f"expected a string, got {type(name).__name__} {_short(name)}", field=field)
    if not name.strip():
        raise DataError(f"is empty: {what} needs the function's name", field=field)
    return name


def _tool_call(call: Any, field: str) -> dict[str, Any]:
    """One tool call, {"name", "arguments"} or OpenAI's {"type": "function", "function": {...}}."""
    if not isinstance(call, Mapping):
        raise DataError(f"expected a tool call object with 'name' and 'arguments', got {type(call).__name__}",
                        field=field)
    fn, fn_field = call, field
    if "function" in call:
        kind = call.get("type", "function")
        if kind != "function":
            raise DataError(f"unsupported tool call type {kind!r}; only 'function' calls are rendered",
                            field=f"{field}.type")
        fn, fn_field = call["function"], f"{field}.function"
        if not isinstance(fn, Mapping):
            raise DataError(f"expected an object with 'name' and 'arguments', got {type(fn).__name__}",
                            field=fn_field)
    out: dict[str, Any] = {"name": _name(fn, f"{fn_field}.name", "a tool call")}
    args, args_field = fn.get("arguments"), f"{fn_field}.arguments"
    if args is None:
        raise DataError("missing" if "arguments" not in fn else "is null", field=args_field)
    if isinstance(args, str):
        parsed = _json_text(args, "a JSON object", args_field)
        if not isinstance(parsed, dict):
            raise DataError(f"expected a JSON object, got JSON {type(parsed).__name__} {_short(parsed)}",
                            field=args_field)
    elif isinstance(args, Mapping):
        args = dict(args)
        _check_json(args, args_field)
    else:
        raise DataError(f"expected an object (or its JSON text), got {type(args).__name__} {_short(args)}",
                        field=args_field)
    out["arguments"] = args
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _tool_calls(value: Any, field: str, *, single_ok: bool) -> list[dict[str, Any]]:
    """A list of tool calls (or its JSON text; with `single_ok`, one call object on its own)."""
    if isinstance(value, str):
        value = _json_text(value, "a tool call object or a list of them" if single_ok else "a list of tool calls",
                           field)
    if hasattr(value, "tolist") and not isinstance(value, list):  # numpy arrays from parquet readers
        value = value.tolist()
    if single_ok and isinstance(value, Mapping):
        return [_tool_call(value, field)]
    if not isinstance(value, list):
        raise DataError(f"expected a list of tool calls, got {type(value).__name__} {_short(value)}", field=field)
    if not value:
        raise DataError("is an empty list of tool calls", field=field)
    return [_tool_call(c, f"{field}[{j}]") for j, c in enumerate(value)]


def _tool_schema(tool: Any, field: str) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise DataError(f"expected a tool schema object, got {type(tool).__name__} {_short(tool)}", field=field)
    if "function" in tool:  # OpenAI form
        kind = tool.get("type", "function")
        if kind != "function":
            raise DataError(f"unsupported tool type {kind!r}; only 'function' tools are rendered",
                            field=f"{field}.type")
        fn = tool["function"]
        if not isinstance(fn, Mapping):
            raise DataError(f"expected a function schema object, got {type(fn).__name__}", field=f"{field}.function")
        _name(fn, f"{field}.function.name", "a tool schema")
        out = {"type": "function", **{k: v for k, v in tool.items() if k != "type"}}
    else:  # a bare function schema {"name", "description", "parameters"}
        _name(tool, f"{field}.name", "a tool schema")
        out = {"type": "function", "function": dict(tool)}
    _check_json(out, field)
    return out


def _tools(record: Mapping) -> list[dict[str, Any]]:
    """The record's `tools`: a list of schemas or its JSON text; absent, null, "" or [] -> no tools."""
    value = record.get("tools")
    if isinstance(value, str):
        if not value.strip():
            return []
        value = _json_text(value, "a list of tool schemas", "tools")
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, list):  # numpy arrays from parquet readers
        value = value.tolist()
    if not isinstance(value, list):
        raise DataError(f"expected a list of tool schemas (or its JSON text), got {type(value).__name__} "
                        f"{_short(value)}", field="tools")
    return [_tool_schema(t, f"tools[{j}]") for j, t in enumerate(value)]


def _sharegpt_turn(turn: Mapping, who: str, role: str, where: str) -> Message | None:
    if who != "function_call":
        return None
    value = turn.get("value")
    if value is None:
        raise DataError("missing", field=f"{where}.value")
    return {"role": "assistant", "content": "", "tool_calls": _tool_calls(value, f"{where}.value", single_ok=True)}


def _openai_turn(turn: Mapping, who: str, role: str, where: str) -> Message | None:
    calls, legacy = turn.get("tool_calls"), turn.get("function_call")
    if isinstance(calls, str):  # CSV cells hold the list as JSON text
        calls = _json_text(calls, "a list of tool calls", f"{where}.tool_calls") if calls.strip() else None
    if hasattr(calls, "tolist") and not isinstance(calls, list):  # numpy arrays from parquet readers
        calls = calls.tolist()
    has_calls = calls is not None and calls != []
    if has_calls and legacy is not None:
        raise DataError("holds both 'tool_calls' and the older 'function_call'; give one", field=f"{where}.tool_calls")
    if (has_calls or legacy is not None) and role != "assistant":
        key = "tool_calls" if has_calls else "function_call"
        raise DataError(f"only assistant messages carry tool calls (this one is {who!r})", field=f"{where}.{key}")
    if has_calls:
        tool_calls = _tool_calls(calls, f"{where}.tool_calls", single_ok=False)
    elif legacy is not None:  # OpenAI's older single call: {"name", "arguments"}
        tool_calls = [_tool_call(legacy, f"{where}.function_call")]
    elif role == "tool":
        message = {"role": role, "content": _content(turn.get("content"), f"{where}.content")}
        for key in ("name", "tool_call_id"):
            if isinstance(turn.get(key), str):
                message[key] = turn[key]
        return message
    else:
        return None
    content = turn.get("content")  # null or absent beside tool calls, as OpenAI writes it
    return {"role": role, "content": "" if content is None else _content(content, f"{where}.content"),
            "tool_calls": tool_calls}


def _with_tools(messages: list[Message], tools: list[dict[str, Any]]) -> list[Message]:
    if tools:
        messages[0]["tools"] = tools
    return messages


def from_sharegpt(record: Mapping) -> list[Message]:
    out = _role_turns(record, "conversations", "from", "value", SHAREGPT_ROLES, _sharegpt_turn)
    # A top-level system prompt is common in ShareGPT exports.
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system})
        offset = 1
    else:
        offset = 0
    tools = _tools(record)
    out = _check_turns(out, lambda i: "conversations" if i is None else f"conversations[{i - offset}].value")
    return _with_tools(out, tools)


def from_messages(record: Mapping) -> list[Message]:
    out = _role_turns(record, "messages", "role", "content", MESSAGES_ROLES, _openai_turn)
    tools = _tools(record)
    return _with_tools(_check_turns(out, lambda i: "messages" if i is None else f"messages[{i}].content"), tools)


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
