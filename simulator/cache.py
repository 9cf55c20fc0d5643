"""Prompt caching as the API does it (anthropic-api.md §4).

A request is a sequence of blocks in prefix order: each tool, each system block, then each
message's content blocks (a string is one text block). A block's key is a hash of the model
and everything up to and including it, so a change anywhere invalidates that block and all
later ones; `tool_choice`, the thinking config and `output_config.effort` are hashed in just
before the first message, so they invalidate the message blocks only.

Breakpoints are the blocks with `cache_control` (`{"type": "ephemeral", "ttl"?: "5m"|"1h"}`),
plus, with a top-level `cache_control` (automatic caching), the last cacheable block. At most
4 in all, 1h ones before 5m ones. A breakpoint whose prefix is shorter than the model's minimum
is ignored: those tokens are processed uncached, without an error.

A request reads the longest live entry found at or up to 20 blocks before any breakpoint,
and writes an entry at each breakpoint after it. Usage splits the input: `cache_read` up to
the hit, cache writes from there to each later breakpoint at that breakpoint's TTL, and
`input_tokens` after the last breakpoint (so every request pays its 3 overhead tokens as
input). Entries live 5 minutes or 1 hour from the start of the request that wrote or read
them (a hit refreshes them). The lookup is made when a request starts and its writes land
when its answer is made: parallel first requests all miss, as at the API.

Only requests with some `cache_control` are hashed at all; the others cost nothing here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import msgspec

from simulator.errors import ApiError
from simulator.pricing import Usage
from simulator.tokens import MESSAGE_OVERHEAD, Body, block_tokens, input_tokens

Ttl = Literal["5m", "1h"]
TTL_S: dict[Ttl, float] = {"5m": 300.0, "1h": 3600.0}
MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20  # per breakpoint, the breakpoint's own block included
# The shortest prefix a breakpoint can cache, per model (§4 table).
MIN_CACHEABLE_TOKENS: dict[str, int] = {
    "claude-haiku-5-5": 512,
    "claude-sonnet-5-5": 512,
    "claude-opus-5-5": 512,
    "claude-haiku-4-5": 4096,
    "claude-sonnet-4-6": 1024,
    "claude-opus-4-8": 1024,
}
UNCACHEABLE_TYPES = frozenset({"thinking", "redacted_thinking"})
_encode = msgspec.json.Encoder().encode


class Block(NamedTuple):
    """One cacheable-or-not block of the prefix."""

    position: int
    prefix_tokens: int  # tokens of everything up to and including this block
    key: bytes  # the cumulative hash: the cache key of a breakpoint here
    cache_control: Any  # the block's own `cache_control`, None if it has none
    cacheable: bool
    where: str  # the field path for error messages, e.g. "messages.0.content.1"


class Breakpoint(NamedTuple):
    block: Block
    ttl: Ttl


class Prefix(NamedTuple):
    """A request's blocks and breakpoints, in prefix order, and its whole input."""

    blocks: list[Block]
    breakpoints: list[Breakpoint]
    input_tokens: int  # equals tokens.input_tokens(body)


class Split(NamedTuple):
    """The input of one request by billing category."""

    input_tokens: int
    write_5m: int = 0
    write_1h: int = 0
    read: int = 0


class Entry(NamedTuple):
    expires_at: float
    ttl: Ttl


class Plan(NamedTuple):
    """What a request reads and writes: its usage split now, the entries it sets once its
    answer is made (Cache.commit)."""

    split: Split
    sets: list[tuple[bytes, Ttl]]  # entries written or refreshed, with their TTL


def uncached(input_tokens: int) -> Plan:
    """The plan of a request without any `cache_control`: all of it is input."""
    return Plan(Split(input_tokens), [])


def usage_of(split: Split, output_tokens: int) -> Usage:
    """The billed usage of a request whose input splits as `split`."""
    return Usage(
        input_tokens=split.input_tokens,
        output_tokens=output_tokens,
        ephemeral_5m_input_tokens=split.write_5m,
        ephemeral_1h_input_tokens=split.write_1h,
        cache_read_input_tokens=split.read,
    )


def prefix_of(body: Body) -> Prefix | None:
    """The blocks and breakpoints of a request, or None if it has no `cache_control` at all.
    Raises ApiError (400) for a bad `cache_control`, more than 4 breakpoints, a 1h breakpoint
    after a 5m one, or automatic caching at a different TTL from the last block's own."""
    auto = body.get("cache_control")
    if auto is None and b'"cache_control"' not in _encode(_cacheables(body)):
        return None
    blocks = list(_blocks(body))
    explicit = [Breakpoint(b, _ttl(b.cache_control, b.where)) for b in blocks if b.cache_control]
    for point in explicit:
        if not point.block.cacheable:
            raise ApiError(
                400,
                f"{point.block.where}.cache_control: cache_control cannot be set for empty "
                "text blocks or thinking blocks",
            )  # wording a guess: §4 only says these cannot be cached
    breakpoints = list(explicit)
    if auto is not None:
        breakpoints = _with_automatic(breakpoints, blocks, _ttl(auto, "cache_control"))
    found = len(explicit) + (auto is not None)
    if found > MAX_BREAKPOINTS:
        raise ApiError(
            400,
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {found}.",
        )
    _check_ttl_order(breakpoints)
    return Prefix(blocks, breakpoints, input_tokens(body))


def _cacheables(body: Body) -> list[Any]:
    return [body.get("tools"), body.get("system"), [m["content"] for m in body["messages"]]]


def _blocks(body: Body) -> Iterable[Block]:
    """Every block in prefix order with its running token count and cumulative hash."""
    digest = hashlib.sha256(_encode(body["model"]))
    running = 0
    carry = 0  # message overhead, counted with the message's first block
    position = 0

    def block(part: Any, block_: dict[str, Any], where: str) -> Block:
        nonlocal running, carry, position
        shown = {k: v for k, v in block_.items() if k != "cache_control"}
        digest.update(_encode([part, shown]))
        running += carry + block_tokens(block_)
        carry = 0
        kind = block_.get("type")
        cacheable = kind not in UNCACHEABLE_TYPES and not (kind == "text" and not block_["text"])
        made = Block(position, running, digest.digest(), block_.get("cache_control"),
                     cacheable, where)  # fmt: skip
        position += 1
        return made

    for i, tool in enumerate(body.get("tools") or ()):
        yield block("tool", tool, f"tools.{i}")
    system = body.get("system")
    if isinstance(system, str):
        yield block("system", {"type": "text", "text": system}, "system")
    for i, sys_block in enumerate(system if isinstance(system, list) else ()):
        yield block("system", sys_block, f"system.{i}")
    output_config = body.get("output_config")
    effort = output_config.get("effort") if isinstance(output_config, dict) else None
    digest.update(_encode(["context", body.get("tool_choice"), body.get("thinking"), effort]))
    for i, message in enumerate(body["messages"]):
        digest.update(_encode(["message", message["role"]]))
        carry += MESSAGE_OVERHEAD
        content = message["content"]
        if isinstance(content, str):
            yield block("content", {"type": "text", "text": content}, f"messages.{i}.content")
            continue
        for j, content_block in enumerate(content):
            yield block("content", content_block, f"messages.{i}.content.{j}")


def _ttl(cache_control: Any, where: str) -> Ttl:
    if not isinstance(cache_control, dict) or cache_control.get("type") != "ephemeral":
        raise ApiError(400, f"{where}.cache_control.type: Input should be 'ephemeral'")
    ttl = cache_control.get("ttl", "5m")
    if ttl not in TTL_S:
        raise ApiError(400, f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
    extra = set(cache_control) - {"type", "ttl"}
    if extra:
        raise ApiError(400, f"{where}.cache_control.{min(extra)}: Extra inputs are not permitted")
    return "1h" if ttl == "1h" else "5m"


def _with_automatic(
    breakpoints: list[Breakpoint], blocks: list[Block], ttl: Ttl
) -> list[Breakpoint]:
    """Add automatic caching's breakpoint: on the last cacheable block."""
    last = next((b for b in reversed(blocks) if b.cacheable), None)
    if last is None:
        return breakpoints
    same = next((p for p in breakpoints if p.block.position == last.position), None)
    if same is None:
        return [*breakpoints, Breakpoint(last, ttl)]
    if same.ttl != ttl:
        raise ApiError(
            400,
            f"cache_control: automatic caching (ttl {ttl!r}) lands on {last.where}, whose own "
            f"cache_control has ttl {same.ttl!r}; give both the same ttl",
        )  # wording a guess: §4 says only that this is a 400
    return breakpoints


def _check_ttl_order(breakpoints: list[Breakpoint]) -> None:
    """1h entries must come before 5m entries (§4)."""
    seen_5m: Breakpoint | None = None
    for point in sorted(breakpoints, key=lambda p: p.block.position):
        if point.ttl == "5m" and seen_5m is None:
            seen_5m = point
        elif point.ttl == "1h" and seen_5m is not None:
            # Wording a guess: §4 states the rule, not the error text.
            raise ApiError(
                400,
                f"{point.block.where}.cache_control: a ttl='1h' cache_control block must not "
                f"come after a ttl='5m' cache_control block ({seen_5m.block.where}); put 1h "
                "breakpoints first",
            )


class Cache:
    """The cache entries of every model (the key hashes the model in). Times are the
    simulator's clock, passed in as `now` by the caller: the start of the request."""

    def __init__(self) -> None:
        self.entries: dict[bytes, Entry] = {}
        self._sweep_at = 1024

    def plan(self, model: str, prefix: Prefix, now: float) -> Plan:
        """What a request starting at `now` reads and writes; changes nothing."""
        least = MIN_CACHEABLE_TOKENS.get(model, 1024)
        points = sorted(
            (p for p in prefix.breakpoints if p.block.prefix_tokens >= least),
            key=lambda p: p.block.position,
        )
        if not points:
            return Plan(Split(prefix.input_tokens), [])
        hit = self._longest_hit(prefix.blocks, points, now)
        read = hit.prefix_tokens if hit is not None else 0
        done = read
        writes: dict[Ttl, int] = {"5m": 0, "1h": 0}
        sets: list[tuple[bytes, Ttl]] = []
        for point in points:
            block = point.block
            if hit is not None and block.position <= hit.position:
                entry = self.entries.get(block.key)
                if entry is not None and entry.expires_at > now:  # refreshed by this read
                    sets.append((block.key, _longer(entry.ttl, point.ttl)))
                continue
            writes[point.ttl] += block.prefix_tokens - done
            done = block.prefix_tokens
            sets.append((block.key, point.ttl))
        if hit is not None and not any(key == hit.key for key, _ in sets):
            sets.append((hit.key, self.entries[hit.key].ttl))  # found by the lookback
        split = Split(prefix.input_tokens - done, writes["5m"], writes["1h"], read)
        return Plan(split, sets)

    def _longest_hit(
        self, blocks: list[Block], points: list[Breakpoint], now: float
    ) -> Block | None:
        best: Block | None = None
        for point in points:
            start = point.block.position
            for position in range(start, max(-1, start - LOOKBACK_BLOCKS), -1):
                if best is not None and position <= best.position:
                    break
                entry = self.entries.get(blocks[position].key)
                if entry is not None and entry.expires_at > now:
                    best = blocks[position]
                    break
        return best

    def commit(self, plan: Plan, now: float) -> None:
        """Set the plan's entries, live for their TTL from `now` (the request's start)."""
        for key, ttl in plan.sets:
            expires_at = now + TTL_S[ttl]
            old = self.entries.get(key)
            if old is None or old.expires_at < expires_at:
                self.entries[key] = Entry(expires_at, ttl)
        if len(self.entries) >= self._sweep_at:
            self.entries = {k: e for k, e in self.entries.items() if e.expires_at > now}
            self._sweep_at = 2 * len(self.entries) + 1024


def _longer(a: Ttl, b: Ttl) -> Ttl:
    return a if TTL_S[a] >= TTL_S[b] else b
