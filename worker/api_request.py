"""The Messages API request a job carries (its `request` field): what tokenq accepts.

`parse_request` decodes the JSON, refuses nesting deeper than MAX_DEPTH before anything walks
it (every walk here is iterative or bounded by that depth), then checks the request as the API
would: the fields tokenq passes on, every content block type the API accepts (SDK 2.x
ContentBlockParam) with its required fields and their types, image and document sources,
tools, tool_choice, metadata, thinking, and the API's limits (100,000 messages, four
cache_control breakpoints). Each problem is one sentence naming the path, e.g.
"`messages[0].content[1].text` must be a string, not the number 7". Fields the API adds to a
block beyond these are left to the API (an error there is `invalid_request`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec

from worker.contract import Request, shown
from worker.errors import MalformedJob

REQUEST_FIELDS = (
    "messages", "system", "max_tokens", "stop_sequences", "tools", "tool_choice", "metadata",
    "thinking",
)  # fmt: skip
MAX_DEPTH = 64  # JSON nesting of a request; deeper ones are refused before anything walks them
MAX_MESSAGES = 100_000  # the Messages API's limit
MAX_BREAKPOINTS = 4  # cache_control blocks the API accepts in one request
EXAMPLE = '{"messages":[{"role":"user","content":"Hi"}]}'

_decode_any = msgspec.json.Decoder().decode


def _name(name: str) -> str:
    """A field name inside backquotes in a sentence: short and escaped."""
    return shown(name, 60)[1:-1]


def parse_request(text: str) -> Request:
    """The `request` field as a Request, or MalformedJob saying what is wrong with it."""
    try:
        raw = _decode_any(text)
    except RecursionError:
        raise MalformedJob(_deep()) from None
    except msgspec.DecodeError as exc:
        raise MalformedJob(
            f"`request` is not valid JSON ({exc}); it must be a JSON object of Messages API "
            f"parameters, e.g. {EXAMPLE}. Fix the producer."
        ) from None
    problem = _too_deep(raw) or request_problem(raw)
    if problem is not None:
        raise MalformedJob(f"`request` is not valid: {problem}. Fix the producer.")
    try:
        return msgspec.convert(raw, Request)
    except msgspec.ValidationError as exc:  # the checks above are meant to catch all of it
        raise MalformedJob(f"`request` is not valid: {exc}. Fix the producer.") from None


def _deep() -> str:
    return (
        f"`request` is nested more than {MAX_DEPTH} levels deep; tokenq accepts at most "
        f"{MAX_DEPTH} (objects and arrays within each other). Fix the producer."
    )


def _too_deep(raw: Any) -> str | None:
    """A sentence when `raw` nests more than MAX_DEPTH levels (walked without recursion)."""
    todo: list[tuple[Any, int]] = [(raw, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_DEPTH:
            return f"it is nested more than {MAX_DEPTH} levels deep (at most {MAX_DEPTH})"
        if isinstance(value, dict):
            todo.extend((v, depth + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            todo.extend((v, depth + 1) for v in value if isinstance(v, dict | list))
    return None


def _kind(value: Any) -> str:
    """What a JSON value is, for a sentence."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {shown(value, 40)}"
    return "an array" if isinstance(value, list) else "an object"


def _must(path: str, want: str, value: Any) -> str:
    return f"`{path}` must be {want}, not {_kind(value)}"


def request_problem(raw: Any) -> str | None:
    """Why a decoded request is not one tokenq accepts (a sentence), or None."""
    if not isinstance(raw, dict):
        return f"it must be a JSON object of Messages API parameters, not {_kind(raw)}"
    for name in raw:
        if name not in REQUEST_FIELDS:
            return _unknown_field(name)
    if "messages" not in raw:
        return f"it has no `messages`; e.g. {EXAMPLE}"
    for problem in _request_parts(raw):
        if problem is not None:
            return problem
    breakpoints = sum(1 for _ in _cache_controls(raw))
    if breakpoints > MAX_BREAKPOINTS:
        return (
            f"it marks {breakpoints} cache_control breakpoints; the API accepts at most "
            f"{MAX_BREAKPOINTS}"
        )
    return None


def _unknown_field(name: str) -> str:
    if name in ("temperature", "top_p", "top_k"):
        return f"`{name}` is not accepted: the API version 2026-10-21 rejects it; drop it"
    if name == "model":
        return "`model` is chosen by tokenq; drop it (a job's `tier` field forces a tier)"
    return (
        f"`{_name(name)}` is not a request field tokenq accepts "
        f"(allowed: {', '.join(REQUEST_FIELDS)})"
    )


def _request_parts(raw: dict[str, Any]) -> Iterator[str | None]:
    """The problem of each part in turn (lazily: the first one found is reported)."""
    yield _messages(raw["messages"])
    if raw.get("system") is not None:
        yield _system(raw["system"])
    if "max_tokens" in raw and raw["max_tokens"] is not None:
        yield _max_tokens(raw["max_tokens"])
    yield _string_list(raw.get("stop_sequences"), "stop_sequences")
    yield _tools(raw.get("tools"))
    yield _tool_choice(raw.get("tool_choice"))
    yield _metadata(raw.get("metadata"))
    yield _thinking(raw.get("thinking"))


def _messages(value: Any) -> str | None:
    if not isinstance(value, list):
        return _must("messages", "an array of messages", value)
    if not value:
        return f"`messages` is empty; give at least one message, e.g. {EXAMPLE}"
    if len(value) > MAX_MESSAGES:
        return f"`messages` has {len(value):,} messages; the API accepts at most {MAX_MESSAGES:,}"
    for n, message in enumerate(value):
        problem = _message(message, f"messages[{n}]")
        if problem is not None:
            return problem
    return None


def _message(message: Any, path: str) -> str | None:
    if not isinstance(message, dict):
        return _must(path, 'an object with "role" and "content"', message)
    for name in message:
        if name not in ("role", "content"):
            return f"`{path}.{_name(name)}` is not allowed; a message has `role` and `content`"
    role = message.get("role")
    if role not in ("user", "assistant"):
        return f'`{path}.role` must be "user" or "assistant", not {_kind(role)}'
    if "content" not in message:
        return f"`{path}` has no `content`"
    content = message["content"]
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return _must(f"{path}.content", "a string or an array of content blocks", content)
    for n, block in enumerate(content):
        problem = _block(block, f"{path}.content[{n}]", role)
        if problem is not None:
            return problem
    return None


STR, OBJ, LIST, BOOL = "a string", "an object", "an array", "true or false"
_TYPES: dict[str, type | tuple[type, ...]] = {STR: str, OBJ: dict, LIST: list, BOOL: bool}
_TOOL_RESULT_CONTENT = {"tool_use_id": STR, "content": "content"}  # any JSON `content`
# The content blocks the Messages API accepts (SDK 2.x ContentBlockParam) and their required
# fields; "content" is any value (server tools' results, checked by the API).
BLOCKS: dict[str, dict[str, str]] = {
    "text": {"text": STR},
    "image": {"source": "source"},
    "document": {"source": "source"},
    "search_result": {"content": LIST, "source": STR, "title": STR},
    "thinking": {"thinking": STR, "signature": STR},
    "redacted_thinking": {"data": STR},
    "tool_use": {"id": STR, "name": STR, "input": OBJ},
    "server_tool_use": {"id": STR, "name": STR, "input": OBJ},
    "tool_result": {"tool_use_id": STR},
    "web_search_tool_result": _TOOL_RESULT_CONTENT,
    "web_fetch_tool_result": _TOOL_RESULT_CONTENT,
    "code_execution_tool_result": _TOOL_RESULT_CONTENT,
    "bash_code_execution_tool_result": _TOOL_RESULT_CONTENT,
    "text_editor_code_execution_tool_result": _TOOL_RESULT_CONTENT,
    "tool_search_tool_result": _TOOL_RESULT_CONTENT,
    "container_upload": {"file_id": STR},
}
# Blocks inside a tool_result's `content` array.
TOOL_RESULT_BLOCKS: dict[str, dict[str, str]] = {
    **{k: BLOCKS[k] for k in ("text", "image", "search_result", "document")},
    "tool_reference": {"tool_name": STR},
}
SOURCES: dict[str, dict[str, dict[str, str]]] = {
    "image": {
        "base64": {"media_type": STR, "data": STR},
        "url": {"url": STR},
        "file": {"file_id": STR},
    },
    "document": {
        "base64": {"media_type": STR, "data": STR},
        "text": {"media_type": STR, "data": STR},
        "url": {"url": STR},
        "content": {"content": "content"},
        "file": {"file_id": STR},
    },
}
# Optional fields of every block, with their types when present and not null.
OPTIONAL: dict[str, str] = {
    "citations": "citations", "is_error": BOOL, "title": STR, "context": STR,
    "cache_control": "cache_control",
}  # fmt: skip


def _block(
    block: Any, path: str, role: str, accepted: dict[str, dict[str, str]] = BLOCKS
) -> str | None:
    if not isinstance(block, dict):
        return _must(path, 'a content block (an object with a "type")', block)
    kind = block.get("type")
    if not isinstance(kind, str):
        return _must(f"{path}.type", 'a string such as "text"', kind)
    required = accepted.get(kind)
    if required is None:
        return (
            f"`{path}.type` is {shown(kind, 40)}; the API accepts content blocks of type "
            f"{', '.join(accepted)}"
        )
    for name, want in required.items():
        if name not in block:
            return f'`{path}` (a "{kind}" block) has no `{name}`'
        problem = _field(block[name], f"{path}.{name}", want, kind)
        if problem is not None:
            return problem
    for name, want in OPTIONAL.items():
        if block.get(name) is not None and name not in required:
            problem = _field(block[name], f"{path}.{name}", want, kind)
            if problem is not None:
                return problem
    return _block_rules(block, path, role, kind)


def _block_rules(block: dict[str, Any], path: str, role: str, kind: str) -> str | None:
    """The API's rules that depend on where a block is (API version 2026-10-21), and the
    blocks inside a block."""
    if kind == "document" and role == "assistant":
        return f"`{path}` is a document block in an assistant turn; the API refuses that"
    if kind == "text" and role == "user" and block.get("citations"):
        return f"`{path}.citations` is not allowed in a user turn; the API refuses that"
    if kind == "search_result":
        return _inner(block["content"], f"{path}.content", role, {"text": BLOCKS["text"]})
    if kind == "tool_result" and block.get("content") is not None:
        content = block["content"]
        if isinstance(content, str):
            return None
        if not isinstance(content, list):
            return _must(f"{path}.content", "a string or an array of content blocks", content)
        return _inner(content, f"{path}.content", role, TOOL_RESULT_BLOCKS)
    return None


def _inner(
    blocks: list[Any], path: str, role: str, accepted: dict[str, dict[str, str]]
) -> str | None:
    for n, block in enumerate(blocks):
        problem = _block(block, f"{path}[{n}]", role, accepted)
        if problem is not None:
            return problem
    return None


def _field(value: Any, path: str, want: str, kind: str) -> str | None:
    """One field of a block against what it must be."""
    if want in _TYPES:
        return None if isinstance(value, _TYPES[want]) else _must(path, want, value)
    if want == "source":
        return _source(value, path, kind)
    if want == "cache_control":
        return _cache_control(value, path)
    if want == "citations" and not isinstance(value, list | dict):
        return _must(path, "an array (or an object for documents)", value)
    return None  # "content": any JSON value


def _source(value: Any, path: str, kind: str) -> str | None:
    if not isinstance(value, dict):
        return _must(path, 'an object with a "type"', value)
    sources, source_type = SOURCES[kind], value.get("type")
    required = sources.get(source_type) if isinstance(source_type, str) else None
    if required is None:
        return (
            f"`{path}.type` is {_kind(source_type)}; a {kind} source is one of {', '.join(sources)}"
        )
    for name, want in required.items():
        if name not in value:
            return f"`{path}` has no `{name}`"
        problem = _field(value[name], f"{path}.{name}", want, kind)
        if problem is not None:
            return problem
    return None


def _cache_control(value: Any, path: str) -> str | None:
    if not isinstance(value, dict) or value.get("type") != "ephemeral":
        return f'`{path}` must be {{"type": "ephemeral"}} (with an optional "ttl"), not ' + (
            _kind(value)
        )
    if value.get("ttl") not in (None, "5m", "1h"):
        return f'`{path}.ttl` must be "5m" or "1h", not {_kind(value.get("ttl"))}'
    return None


def _system(value: Any) -> str | None:
    if isinstance(value, str):
        return None
    if not isinstance(value, list):
        return _must("system", "a string or an array of text blocks", value)
    for n, block in enumerate(value):
        problem = _block(block, f"system[{n}]", "system", {"text": BLOCKS["text"]})
        if problem is not None:
            return problem
    return None


MAX_TOKENS = 1_000_000  # far above any model's output (128K; 300K in batches): a broken producer


def _max_tokens(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS:
        return _must("max_tokens", f"a whole number from 1 to {MAX_TOKENS:,}", value)
    return None


def _string_list(value: Any, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list):
        return _must(path, "an array of strings", value)
    for n, item in enumerate(value):
        if not isinstance(item, str):
            return _must(f"{path}[{n}]", STR, item)
    return None


def _tools(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list):
        return _must("tools", "an array of tool definitions", value)
    for n, tool in enumerate(value):
        path = f"tools[{n}]"
        if not isinstance(tool, dict):
            return _must(path, "a tool definition (an object)", tool)
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            return _must(f"{path}.name", "a non-empty string", tool.get("name"))
        custom = tool.get("type") in (None, "custom")
        if custom and not isinstance(tool.get("input_schema"), dict):
            return _must(f"{path}.input_schema", "a JSON Schema object", tool.get("input_schema"))
        if not custom and not isinstance(tool.get("type"), str):
            return _must(f"{path}.type", "a string", tool.get("type"))
        if tool.get("cache_control") is not None:
            problem = _cache_control(tool["cache_control"], f"{path}.cache_control")
            if problem is not None:
                return problem
    return None


def _tool_choice(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("auto", "any", "tool", "none"):
        return _must("tool_choice", 'an object with "type" auto, any, tool or none', value)
    if value["type"] == "tool" and not isinstance(value.get("name"), str):
        return _must("tool_choice.name", "the name of a tool (a string)", value.get("name"))
    return None


def _metadata(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return _must("metadata", 'an object such as {"user_id": "..."}', value)
    for name in value:
        if name != "user_id":
            return f"`metadata.{_name(name)}` is not accepted; the API knows only `user_id`"
    user = value.get("user_id")
    return None if user is None or isinstance(user, str) else _must("metadata.user_id", STR, user)


def _thinking(value: Any) -> str | None:
    if value is None:
        return None
    kinds = ("enabled", "adaptive", "disabled", "between_tools")
    if not isinstance(value, dict) or value.get("type") not in kinds:
        return _must("thinking", f'an object with "type" {", ".join(kinds)}', value)
    budget = value.get("budget_tokens")
    if value["type"] == "enabled" and (
        isinstance(budget, bool) or not isinstance(budget, int) or budget < 1024
    ):
        return _must("thinking.budget_tokens", "a whole number of at least 1024", budget)
    return None


def _cache_controls(raw: dict[str, Any]) -> Iterator[None]:
    """One item per cache_control breakpoint the request marks (tools, system, messages)."""
    parts: list[Any] = [*(raw.get("tools") or []), *(_listed(raw.get("system")))]
    for message in raw["messages"]:
        parts += _listed(message.get("content"))
    while parts:
        part = parts.pop()
        if isinstance(part, dict):
            if part.get("cache_control") is not None:
                yield None
            if part.get("type") == "tool_result":
                parts += _listed(part.get("content"))


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
