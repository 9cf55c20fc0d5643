"""Deterministic token counts and replies, so tests and benchmarks can predict the bill.

Counting rule (documented in the README): every piece of text counts ceil(characters / 4)
tokens (the reference workload writes about 4 characters a token); a non-text content block
(tool_use, tool_result, image source ...) counts as its JSON text; every tool definition counts
as its JSON text; each message adds 4 tokens of overhead and each request 3. It is not
Anthropic's tokenizer, only a stable stand-in with the right order of magnitude.

Replies: the reply length in tokens is 10 + (a hash of the request) % 60, one 3-letter word and
a space (4 characters) a token. A request whose system prompt or last user message contains
"JSON" gets a JSON object as its text. A reply longer than max_tokens is cut and ends with
stop_reason "max_tokens"; a stop sequence found in the reply cuts it with "stop_sequence".
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# 3-letter words: with a space, 4 characters a token.
_WORDS = "the cat sat mat and saw one big red sun set far off you can ask any key due old new top "
WORDS = (_WORDS + "end way use see fix run add get put let now our out too").split()


def text_tokens(text: str) -> int:
    return -(-len(text) // 4)


def block_tokens(block: Any) -> int:
    if isinstance(block, dict) and block.get("type") == "text":
        return text_tokens(str(block.get("text", "")))
    return text_tokens(json.dumps(block, separators=(",", ":"), sort_keys=True))


def content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return text_tokens(content)
    return sum(block_tokens(b) for b in content)


def input_tokens(body: dict[str, Any]) -> int:
    """The input tokens a request bills (also what count_tokens answers)."""
    total = 3
    system = body.get("system")
    if system is not None:
        total += content_tokens(system)
    for tool in body.get("tools") or []:
        total += block_tokens(tool)
    for message in body["messages"]:
        total += 4 + content_tokens(message["content"])
    return total


def _asks_for_json(body: dict[str, Any]) -> bool:
    system = body.get("system")
    system_text = system if isinstance(system, str) else json.dumps(system or "")
    last = body["messages"][-1]
    last_text = last["content"] if isinstance(last["content"], str) else json.dumps(last)
    return "JSON" in system_text or (last["role"] == "user" and "JSON" in last_text)


def reply(body: dict[str, Any]) -> tuple[str, int, str, str | None]:
    """(text, output tokens, stop_reason, stop_sequence) for a request, always the same."""
    key = json.dumps(
        [body.get("model"), body.get("system"), body["messages"]], sort_keys=True
    ).encode()
    digest = hashlib.sha256(key).digest()
    wanted = 10 + int.from_bytes(digest[:4], "big") % 60
    words = [WORDS[b % len(WORDS)] for b in (digest * (wanted // len(digest) + 1))[:wanted]]
    text = " ".join(words)
    if _asks_for_json(body):
        text = json.dumps({"answer": " ".join(words[3:])})
    tokens = text_tokens(text)
    max_tokens = int(body.get("max_tokens", tokens))
    for stop in body.get("stop_sequences") or []:
        at = text.find(stop)
        if stop and at >= 0 and text_tokens(text[:at]) <= max_tokens:
            return text[:at], text_tokens(text[:at]), "stop_sequence", stop
    if tokens > max_tokens:
        cut = text[: max_tokens * 4]
        return cut, max_tokens, "max_tokens", None
    return text, tokens, "end_turn", None
