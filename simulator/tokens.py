"""Deterministic token counts and replies, so tests and benchmarks can predict the bill.

Counting rule (not Anthropic's tokenizer; a stable stand-in of the right order of magnitude):

- a piece of text counts ceil(characters / 4) tokens;
- `system`: the string, or the text of each of its text blocks;
- each message: 4 tokens of overhead plus its content: the string, or per block the text of a
  `text` block, and the compact JSON of any other block (tool_use, tool_result, image ...);
- each entry of `tools`: its compact JSON;
- each request: 3 tokens of overhead.

`cache_control` is left out of the JSON, so marking a block cacheable does not change the count.
POST /v1/messages bills exactly what POST /v1/messages/count_tokens answers.

Replies: a hash of (model, system, messages) seeds the choice of a length (10 to 69 tokens)
and of the words: 3-letter words and a space, 4 characters a token. If the system prompt or the
last user message contains "JSON", the text is a JSON object {"answer": "..."}. A reply longer
than max_tokens is cut to max_tokens tokens with stop_reason "max_tokens"; a stop sequence found in
it cuts it there with "stop_sequence"; otherwise it ends with "end_turn".

With the ground truth on (truth.py) a JSON answer takes one of FORMS instead, each exactly as
many tokens as the plain answer, so right and wrong answers cost the same:
    valid          {"answer": "...", "label": L} with L one of LABELS (right answers, and
                   wrong ones that do not show)
    not_json       the plain words
    missing_label  {"answer": "..."}
    bad_label      {"answer": "...", "label": "unknown"}
JSON_SCHEMA is what every `valid` answer passes and the last two fail.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, NamedTuple

import msgspec

Body = dict[str, Any]  # a decoded request body; validate.py has checked its shape

REQUEST_OVERHEAD = 3
MESSAGE_OVERHEAD = 4
MIN_REPLY_WORDS = 10
MAX_REPLY_WORDS = MIN_REPLY_WORDS + 59

_WORDS = [
    "the", "cat", "sat", "mat", "and", "saw", "one", "big", "red", "sun", "set", "far", "off",
    "you", "can", "ask", "any", "key", "due", "old", "new", "top", "end", "way", "use", "see",
    "fix", "run", "add", "get", "put", "let", "now", "our", "out", "too",
]  # fmt: skip
_encode = msgspec.json.Encoder().encode
Form = Literal["auto", "valid", "not_json", "missing_label", "bad_label"]
FORMS: tuple[Form, ...] = ("valid", "not_json", "missing_label", "bad_label")
LABELS = ("billing", "account", "shipping", "technical", "other")
BAD_LABEL = "unknown"
JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["answer", "label"],
    "properties": {"answer": {"type": "string"}, "label": {"enum": list(LABELS)}},
}


def text_tokens(text: str) -> int:
    return -(-len(text) // 4)


def _json_tokens(value: Any) -> int:
    if isinstance(value, dict) and "cache_control" in value:
        value = {k: v for k, v in value.items() if k != "cache_control"}
    return text_tokens(_encode(value).decode())


def block_tokens(block: Any) -> int:
    """One content block, system block or tool definition."""
    if block.get("type") == "text":
        return text_tokens(block.get("text", ""))
    return _json_tokens(block)


def content_tokens(content: str | list[Any]) -> int:
    if isinstance(content, str):
        return text_tokens(content)
    return sum(block_tokens(b) for b in content)


def input_tokens(body: Body) -> int:
    """The input tokens a request bills, and what count_tokens answers."""
    total = REQUEST_OVERHEAD
    system = body.get("system")
    if system is not None:
        total += content_tokens(system)
    for tool in body.get("tools") or ():
        total += _json_tokens(tool)
    for message in body["messages"]:
        total += MESSAGE_OVERHEAD + content_tokens(message["content"])
    return total


def _text_of(content: str | list[Any] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return " ".join(b.get("text", "") for b in content if b.get("type") == "text")


def asks_for_json(body: Body) -> bool:
    """Whether the system prompt or the last user message contains "JSON"."""
    if "JSON" in _text_of(body.get("system")):
        return True
    last_user = next((m for m in reversed(body["messages"]) if m["role"] == "user"), None)
    return last_user is not None and "JSON" in _text_of(last_user["content"])


class Reply(NamedTuple):
    text: str
    output_tokens: int
    stop_reason: str
    stop_sequence: str | None


def _full_text(body: Body, form: Form) -> str:
    key = _encode([body.get("model"), body.get("system"), body["messages"]])
    # An extendable-output hash gives the length byte and one byte per word in one C call,
    # many times cheaper than seeding a random.Random per request.
    digest = hashlib.shake_128(key).digest(1 + MAX_REPLY_WORDS)
    words = [_WORDS[b % len(_WORDS)] for b in digest[1 : 1 + MIN_REPLY_WORDS + digest[0] % 60]]
    plain = " ".join(words)  # 4n - 1 characters: n tokens
    if form == "auto":
        if asks_for_json(body):  # 4n characters
            return _encode({"answer": " ".join(words[3:])}).decode()
        return plain
    if form == "not_json":
        return plain
    shell: dict[str, str] = {"answer": ""}
    if form != "missing_label":
        shell["label"] = BAD_LABEL if form == "bad_label" else LABELS[sum(digest) % len(LABELS)]
    # The answer's words fill the object to 4n characters, the plain answer's n tokens.
    fill = 4 * len(words) - len(_encode(shell))
    return _encode({**shell, "answer": plain[:fill]}).decode()


def reply(body: Body, form: Form = "auto", text: str | None = None) -> Reply:
    """The reply to a request: always the same for the same model, system, messages and
    `form` (truth.py picks it; "auto" is the answer without ground truth); `text`, when
    given, replaces the words (the router classifier's tier name)."""
    if text is None:
        text = _full_text(body, form)
    max_tokens = int(body.get("max_tokens", text_tokens(text)))
    for stop in body.get("stop_sequences") or ():
        at = text.find(stop) if stop else -1
        if at >= 0 and text_tokens(text[:at]) <= max_tokens:
            return Reply(text[:at], text_tokens(text[:at]), "stop_sequence", stop)
    if text_tokens(text) > max_tokens:
        return Reply(text[: max_tokens * 4], max_tokens, "max_tokens", None)
    return Reply(text, text_tokens(text), "end_turn", None)
