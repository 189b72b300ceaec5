"""Per-record format detection and normalisation to an `Example`.

Formats (TRL's dataset formats, plus ShareGPT):

- text:               {"text": "..."}
- messages:           {"messages": [{"role": ..., "content": ...}, ...]}
- sharegpt:           {"conversations": [{"from": "human", "value": ...}, ...]} (converted to messages)
- prompt_completion:  {"prompt": str | messages, "completion": str | messages}
- tokens:             {"input_ids": [...], "labels": [...] (optional)} (pre-tokenized)
- formatting_func:    a user function maps the record to a string, treated as a text row

Malformed records raise `RowError` with a short reason; the data stages turn those into
rejects instead of failing the whole build.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional, Union

from trainer.core.config import DataConfig, FieldNames

ROLES = ("system", "user", "assistant", "tool")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
}

class RowError(ValueError):
    """A malformed record; `reason` is short and human readable (it goes into rejects)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


Message = dict  # {"role": str, "content": str}


@dataclass
class Example:
    kind: str  # "text", "messages", "prompt_completion" or "tokens"
    text: Optional[str] = None
    messages: Optional[list[Message]] = None
    prompt: Optional[Union[str, list[Message]]] = None
    completion: Optional[Union[str, list[Message]]] = None
    input_ids: Optional[list[int]] = None
    labels: Optional[list[int]] = None
    # Tool definitions passed to the chat template (conversational rows only).
    tools: Optional[list[dict]] = None


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def detect_format(record: dict, fields: FieldNames) -> str:
    """The format of one record: messages | sharegpt | prompt_completion | text | tokens.

    Pre-tokenized records win (as in TRL, `input_ids` means "already tokenized"), then
    conversations, then prompt/completion, then text.
    """
    if not isinstance(record, dict):
        raise RowError(f"record: expected an object, got {_type_name(record)}")
    get = record.get
    if get(fields.input_ids) is not None:
        return "tokens"
    if get(fields.messages) is not None:
        return "messages"
    if get(fields.conversations) is not None:
        return "sharegpt"
    has_p, has_c = get(fields.prompt) is not None, get(fields.completion) is not None
    if has_p and has_c:
        return "prompt_completion"
    if has_p or has_c:
        missing = fields.completion if has_p else fields.prompt
        raise RowError(f"missing field '{missing}'")
    if get(fields.text) is not None:
        return "text"
    keys = sorted(str(k) for k in record)[:8]
    raise RowError(
        f"no known format: expected '{fields.messages}', '{fields.conversations}', "
        f"'{fields.prompt}'+'{fields.completion}', '{fields.text}' or '{fields.input_ids}' "
        f"(got keys {keys}; data.fields maps other names, data.formatting_func builds text from any record)"
    )


def _messages(
    value: Any,
    where: str,
    role_key: str,
    content_key: str,
    role_map: Optional[dict[str, str]] = None,
    alt_keys: Optional[tuple[str, str]] = None,
) -> list[Message]:
    if not isinstance(value, list):
        raise RowError(f"{where}: expected a list of messages, got {_type_name(value)}")
    if not value:
        raise RowError(f"{where}: empty message list")
    out = []
    for i, m in enumerate(value):
        w = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise RowError(f"{w}: expected an object, got {_type_name(m)}")
        rk, ck = role_key, content_key
        if rk not in m and alt_keys is not None and alt_keys[0] in m:
            rk, ck = alt_keys
        if rk not in m:
            raise RowError(f"{w}: missing field '{rk}'")
        role = m[rk]
        if not isinstance(role, str):
            raise RowError(f"{w}.{rk}: expected string, got {_type_name(role)}")
        if role_map is not None:
            mapped = role_map.get(role.strip().lower())
        else:
            mapped = role if role in ROLES else None
        if mapped is None:
            raise RowError(f"{w}.{rk}: unknown role {role!r}")
        message: Message = {"role": mapped}
        tool_calls = m.get("tool_calls")
        if tool_calls is not None:
            if mapped != "assistant":
                raise RowError(f"{w}.tool_calls: only assistant messages make tool calls (role {mapped!r})")
            message["tool_calls"] = _tool_calls(tool_calls, f"{w}.tool_calls")
        content = m.get(ck)
        if content is None and tool_calls is not None:
            content = ""  # a turn that only calls tools
        elif ck not in m:
            raise RowError(f"{w}: missing field '{ck}'")
        if not isinstance(content, str):
            raise RowError(f"{w}.{ck}: content must be a string, got {_type_name(content)}")
        message["content"] = content
        for key in ("tool_call_id", "name") if mapped == "tool" else ():  # which call a result answers
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise RowError(f"{w}.{key}: expected string, got {_type_name(m[key])}")
                message[key] = m[key]
        out.append(message)
    return out


def _tool_calls(value: Any, where: str) -> list[dict]:
    """transformers' convention: [{"type": "function", "function": {"name", "arguments"}}]
    (a bare {"name", "arguments"} is accepted too)."""
    if not isinstance(value, list) or not value:
        raise RowError(f"{where}: expected a non-empty list of tool calls, got {_type_name(value)}")
    out = []
    for i, call in enumerate(value):
        if not isinstance(call, dict):
            raise RowError(f"{where}[{i}]: expected an object, got {_type_name(call)}")
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"{where}[{i}]: a tool call needs function.name")
        args = fn.get("arguments", {})
        if not isinstance(args, (dict, str)):
            raise RowError(f"{where}[{i}].function.arguments: expected an object or a JSON string")
        out.append({**{k: v for k, v in call.items() if k != "function"}, "type": call.get("type", "function"),
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def _tools(record: dict, fields: FieldNames) -> Optional[list[dict]]:
    tools = record.get(fields.tools)
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError(f"{fields.tools}: expected a list of tool definitions (objects)")
    return tools


def _str_or_messages(value: Any, where: str, fields: FieldNames) -> Union[str, list[Message]]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, where, fields.role, fields.content)
    raise RowError(f"{where}: expected string or message list, got {_type_name(value)}")


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list):
        raise RowError(f"{where}: expected a list of int, got {_type_name(value)}")
    for i, v in enumerate(value):
        if type(v) is not int:  # bool is not a token id
            raise RowError(f"{where}[{i}]: expected int, got {_type_name(v)}")
        if not -(2**31) <= v < 2**31:
            raise RowError(f"{where}[{i}]: {v} is out of int32 range")
    return value


def _text(value: Any, where: str) -> Example:
    if not isinstance(value, str):
        raise RowError(f"{where}: expected string, got {_type_name(value)}")
    return Example(kind="text", text=value)


def _get(record: dict, key: str) -> Any:
    if key not in record or record[key] is None:
        raise RowError(f"missing field '{key}'")
    return record[key]


def normalize(
    record: dict, data: DataConfig, formatting_func: Optional[Callable[[dict], str]] = None
) -> Example:
    """Validate one raw record and normalise it to an `Example` (RowError if malformed)."""
    if not isinstance(record, dict):
        raise RowError(f"record: expected an object, got {_type_name(record)}")
    f = data.fields
    fmt = data.format
    if fmt == "formatting_func" or formatting_func is not None:
        func = formatting_func
        if func is None:
            if not data.formatting_func:
                raise ValueError("data.formatting_func is required when data.format is formatting_func")
            func = load_formatting_func(data.formatting_func)
        try:
            text = func(record)
        except RowError:
            raise
        except Exception as e:  # the user's function failed on this record
            raise RowError(f"formatting_func raised {type(e).__name__}: {e}") from None
        return _text(text, "formatting_func")
    if fmt == "auto":
        fmt = detect_format(record, f)

    if fmt == "messages":
        return Example(kind="messages", messages=_messages(_get(record, f.messages), f.messages, f.role, f.content),
                       tools=_tools(record, f))
    if fmt == "sharegpt":
        msgs = _messages(
            _get(record, f.conversations), f.conversations, f.sharegpt_role, f.sharegpt_content,
            role_map=SHAREGPT_ROLES, alt_keys=(f.role, f.content),
        )
        return Example(kind="messages", messages=msgs, tools=_tools(record, f))
    if fmt == "prompt_completion":
        prompt = _str_or_messages(_get(record, f.prompt), f.prompt, f)
        completion = _str_or_messages(_get(record, f.completion), f.completion, f)
        if isinstance(prompt, str) != isinstance(completion, str):
            raise RowError(
                f"{f.prompt}/{f.completion}: both must be strings or both message lists "
                f"(got {_type_name(prompt)} and {_type_name(completion)})"
            )
        return Example(kind="prompt_completion", prompt=prompt, completion=completion,
                       tools=_tools(record, f) if isinstance(prompt, list) else None)
    if fmt == "text":
        return _text(_get(record, f.text), f.text)
    if fmt == "tokens":
        ids = _int_list(_get(record, f.input_ids), f.input_ids)
        if not ids:
            raise RowError(f"{f.input_ids}: empty")
        labels = record.get(f.labels)
        if labels is not None:
            labels = _int_list(labels, f.labels)
            if len(labels) != len(ids):
                raise RowError(
                    f"{f.labels}: length {len(labels)} does not match {f.input_ids} length {len(ids)}"
                )
        return Example(kind="tokens", input_ids=ids, labels=labels)
    raise ValueError(f"unknown data.format {fmt!r}")


def asked_of(example: Example) -> Optional[Union[str, list[Message]]]:
    """What the row asks, as the loop's filters hand it to a verifier (`sample["prompt"]`): the
    prompt string of a prompt/completion row, or a conversation before its last assistant turn;
    None for a row that asks nothing apart from its answer (text, tokens, no assistant turn)."""
    if example.kind == "prompt_completion" and isinstance(example.prompt, str):
        return example.prompt
    conversation = example.messages if example.kind == "messages" else (
        example.prompt + example.completion if example.kind == "prompt_completion" else None)
    if conversation is None:
        return None
    last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
    return None if last is None else conversation[:last]


@lru_cache(maxsize=None)
def load_formatting_func(dotted: str) -> Callable[[dict], str]:
    """Import `package.module:function` (or `package.module.function`)."""
    if ":" in dotted:
        module_name, attr_path = dotted.split(":", 1)
    else:
        module_name, _, attr_path = dotted.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(
            f"formatting_func {dotted!r}: expected 'package.module:function' or 'package.module.function'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"formatting_func {dotted!r}: cannot import module {module_name!r}: {e}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"formatting_func {dotted!r}: {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise ValueError(f"formatting_func {dotted!r}: not callable")
    return obj
