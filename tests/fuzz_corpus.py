"""A seeded corpus of hostile job entries, each with the outcome tokenq owes it.

Shared by tests/integration/test_fuzz.py and bench/fuzz.py (`python3 dev.py bench fuzz`), which
run it against a real fleet and check the outcome with tests/fuzz_check.py. Every entry is what
a producer in any language can XADD: field names and values are bytes.

What a case expects follows the README's rules for hostile input:
- `malformed_job`: bytes that are not UTF-8 in any field name or value; a field of the wrong
  type (in the entry or in `request`: messages, content blocks, numbers or null where text
  goes); JSON nested deeper than any request needs; a `reply_to` naming one of tokenq's keys,
  or an existing key of another type; an explicit `id` shaped like a default id (a stream entry
  id, or `<priority>:<entry id>`), which only jobs without an `id` may have; an `id` or
  `tenant` with control characters or line breaks, or too long (README: ids are 1 to 255
  printable characters, tenants at most 256); a `deadline_ms` that is not a unix time.
- `duplicate_id`: an `id` a finished job already has, with another fingerprint (tenant,
  feature or request); the same fingerprint gets the first job's result, without a call.
- `too_large`: an entry over queue.max_entry_bytes (field names and values together).
- `unknown_feature`, `deadline_exceeded`: as before.
- `ok`: everything else, including ids and tenants with characters beyond ASCII, thousands
  of fields under the size limit, unknown fields, and two entries with one id and one
  fingerprint in flight at once (one result, one call).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Fields = dict[str | bytes, str | bytes]
# Bytes that are not UTF-8: a lone 0xff, a bad continuation, an encoded surrogate, a 5-byte
# form, a cut multi-byte sequence, an overlong slash, a lone continuation byte.
NOT_UTF8 = [
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xe2\x82",
    b"\xc0\xaf",
    b"\x80",
]
WORDS = (
    "queue",
    "token",
    "budget",
    "latency",
    "cache",
    "stream",
    "tenant",
    "invoice",
    "retry",
    "batch",
    "limit",
    "answer",
    "summary",
    "ticket",
    "refund",
    "shipping",
    "review",
)
TENANTS = ("acme", "globex", "initech", "umbrella")
FAQ = ("How do I reset my password?", "Where is my invoice?", "Can I change my plan?")
DEEP = 3000  # nesting levels: far beyond any real request, and beyond a recursive decoder


@dataclass(frozen=True)
class Case:
    """One job entry and the outcome it must have."""

    name: str  # what is hostile (or not) about it
    priority: str
    fields: dict[bytes, bytes]
    expect: str  # "ok", or the error_type of its one dead letter
    mentions: str = ""  # a word its dead letter's reason must contain
    reply_to: str | None = None  # a stream of ours outside the prefix: its reply is checked

    @property
    def job_id(self) -> str | None:
        """The `id` it carries, when that is text a producer could wait on."""
        raw = self.fields.get(b"id")
        try:
            return raw.decode() if raw else None
        except UnicodeDecodeError:
            return None


@dataclass(frozen=True)
class Corpus:
    """The entries of one run, in the order they are submitted."""

    seed: int
    prefix: str
    originals: list[Case]  # submitted first; `cases` reuse their ids
    deferred: list[Case]  # put off through the deferred set before the fleet starts
    cases: list[Case]
    foreign: dict[str, str] = field(default_factory=dict)  # keys outside the prefix: type

    @property
    def every(self) -> list[Case]:
        return [*self.originals, *self.deferred, *self.cases]


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _request(text: str, **extra: Any) -> str:
    return json.dumps({"messages": [{"role": "user", "content": text}], **extra})


def _text(rng: random.Random, words: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _corrupt(value: str, rng: random.Random) -> bytes:
    """value with bytes that are not UTF-8 in its middle."""
    cut = len(value) // 2
    return value[:cut].encode() + rng.choice(NOT_UTF8) + value[cut:].encode()


Build = Callable[[random.Random], Fields]


def _plus(base: Build, extra: Fields) -> Build:
    """base's fields with `extra` over them."""
    return lambda rng: {**base(rng), **extra}


def _without(base: Build, name: str) -> Build:
    return lambda rng: {k: v for k, v in base(rng).items() if k != name}


def _nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "array" else '{"a":' * depth + "1" + "}" * depth


@dataclass(frozen=True)
class _Template:
    name: str
    expect: str
    build: Build  # the entry's fields (`id` is added by the corpus when with_id)
    mentions: str = ""
    heavy: bool = False  # an entry of about max_entry_bytes: used once, not in the random fill
    with_id: bool = True
    reply: bool = False  # give it a reply_to stream of its own (outside the prefix)


class _Builder:
    """Makes the templates for one prefix and size limit."""

    def __init__(self, prefix: str, max_entry_bytes: int, now_ms: int) -> None:
        self.prefix = prefix
        self.max = max_entry_bytes
        self.now_ms = now_ms
        self.foreign = {
            f"{prefix}-foreign:{kind}": kind for kind in ("string", "hash", "list", "set", "zset")
        }

    def base(self, rng: random.Random, **over: str | bytes) -> Fields:
        fields: Fields = {
            "feature": "summarize",
            "request": _request(f"Summarise: {_text(rng)}"),
            "tenant": rng.choice(TENANTS),
        }
        fields.update(over)
        return fields

    def corrupted(self, name: str, value: str) -> Build:
        """A good job whose field `name` has bytes that are not UTF-8 in its value."""
        return lambda rng: {**self.base(rng), name: _corrupt(value, rng)}

    def renamed(self, name: str) -> Build:
        """A good job whose field `name` has bytes that are not UTF-8 in its name."""

        def build(rng: random.Random) -> Fields:
            fields = self.base(rng)
            return {k: v for k, v in fields.items() if k != name} | {
                _corrupt(name, rng): fields[name]
            }

        return build

    def templates(self) -> list[_Template]:
        return [
            *self.good(),
            *self.not_utf8(),
            *self.wrong_types(),
            *self.deep(),
            *self.sizes(),
            *self.reply_tos(),
            *self.ids(),
            *self.others(),
        ]

    def good(self) -> list[_Template]:
        b, ok = self.base, "ok"
        far = str(self.now_ms + 86_400_000)
        tools = [
            {
                "name": "lookup",
                "description": "Look an order up.",
                "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
            }
        ]
        turns = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "Summarise: a b c"}]},
        ]
        return [
            _Template("a plain job", ok, lambda r: b(r)),
            _Template("a job without an id (default id)", ok, lambda r: b(r), with_id=False),
            _Template(
                "text blocks and a system prompt",
                ok,
                lambda r: b(
                    r,
                    request=json.dumps(
                        {
                            "system": "Be brief.",
                            "messages": [
                                {"role": "user", "content": [{"type": "text", "text": _text(r)}]}
                            ],
                        }
                    ),
                ),
            ),
            _Template(
                "system blocks and three turns",
                ok,
                lambda r: b(
                    r,
                    request=json.dumps(
                        {
                            "system": [{"type": "text", "text": "You summarise."}],
                            "messages": turns,
                        }
                    ),
                ),
            ),
            _Template(
                "tools and tool_choice",
                ok,
                lambda r: b(
                    r, request=_request(_text(r), tools=tools, tool_choice={"type": "auto"})
                ),
            ),
            _Template(
                "metadata, stop_sequences, max_tokens",
                ok,
                lambda r: b(
                    r,
                    request=_request(
                        _text(r), metadata={"user_id": "u-1"}, stop_sequences=["END"], max_tokens=50
                    ),
                ),
            ),
            _Template(
                "unicode text: emoji, RTL, combining marks, escaped NUL",
                ok,
                lambda r: b(r, request=_request("Résumé 🚀 مرحبا e\u0301 \u0000 \u2028")),
            ),
            _Template(
                "3,000 unknown fields (under max_entry_bytes)",
                ok,
                lambda r: b(r) | {f"x{i:04}": "1" for i in range(3000)},
            ),
            _Template(
                "unknown fields with control characters",
                ok,
                lambda r: b(r, trace="a\nb\r\x1b[31mred\x00", **{"x-é": "ü"}),
            ),
            _Template(
                "a tenant with control characters and 2,000 characters",
                "malformed_job",
                lambda r: b(r, tenant="t\n\x1b[2J" + "é" * 2000),
            ),
            _Template(
                "an id and a tenant beyond ASCII",
                ok,
                lambda r: {"id": f"fz-{r.random():.6f}-résumé-客户-🚀"} | b(r, tenant="客户-é"),
                with_id=False,
            ),
            _Template("a reply_to stream outside the prefix", ok, lambda r: b(r), reply=True),
            _Template(
                "the shared FAQ cache",
                ok,
                lambda r: b(r, feature="support_faq", request=_request(r.choice(FAQ))),
            ),
            _Template(
                "a JSON-checked feature",
                ok,
                lambda r: b(
                    r, feature="classify_ticket", request=_request(f"Classify: {_text(r)}")
                ),
            ),
            _Template("code review on opus", ok, lambda r: b(r, feature="code_review")),
            _Template(
                "a forced tier, cache off, a far deadline",
                ok,
                lambda r: b(r, tier="sonnet", cache="off", deadline_ms=far),
            ),
            _Template(
                "a request of 100 kB (or half max_entry_bytes)",
                ok,
                lambda r: b(r, request=_request("x " * min(self.max // 4, 50_000))),
            ),
            _Template(
                "an id with a newline forging a log line",
                "malformed_job",
                lambda r: {"id": f"fz-{r.random():.6f}\nINFO job=x status=ok"} | b(r),
                with_id=False,
            ),
            _Template(
                "an id with escape sequences, tab, bidi override",
                "malformed_job",
                lambda r: {"id": f"fz-{r.random():.6f}\x1b[31m\t\u202e\u2028 x"} | b(r),
                with_id=False,
            ),
        ]

    def not_utf8(self) -> list[_Template]:
        b, bad = self.base, "malformed_job"
        valid = {
            "feature": "summarize",
            "id": "fz-bad-utf8",
            "tenant": "acme",
            "tier": "haiku",
            "reply_to": f"fuzzreply:{self.prefix}:x",
            "deadline_ms": "99999999999999",
            "cache": "off",
            "trace": "t-1",
        }
        out = [
            _Template(
                f"bytes not UTF-8 in the value of `{name}`",
                bad,
                self.corrupted(name, value),
                mentions=name,
                with_id=name != "id",
            )
            for name, value in valid.items()
        ]
        out.append(
            _Template(
                "bytes not UTF-8 in the value of `request`",
                bad,
                mentions="request",
                build=lambda r: b(r, request=_corrupt(_request(f"Summarise: {_text(r)}"), r)),
            )
        )
        for name in ("feature", "request"):
            out.append(
                _Template(
                    f"bytes not UTF-8 in the field name `{name}`",
                    bad,
                    self.renamed(name),
                )
            )
        out.append(
            _Template(
                "bytes not UTF-8 in an unknown field's name",
                bad,
                lambda r: b(r) | {b"trace-" + r.choice(NOT_UTF8): b"1"},
            )
        )
        return out

    def wrong_types(self) -> list[_Template]:
        b, bad = self.base, "malformed_job"
        hi = [{"role": "user", "content": "Hi"}]
        requests: dict[str, Any] = {
            "request is a number": 42,
            "request is null": None,
            "request is a string": "hi",
            "request is an array": [hi],
            "request is true": True,
            "messages is a string": {"messages": "hi"},
            "messages is empty": {"messages": []},
            "a message is a number": {"messages": [1]},
            "role system in messages": {"messages": [{"role": "system", "content": "x"}]},
            "a message without content": {"messages": [{"role": "user"}]},
            "a message with an unknown key": {"messages": [{**hi[0], "name": "bob"}]},
            "content is a number": {"messages": [{"role": "user", "content": 5}]},
            "content is null": {"messages": [{"role": "user", "content": None}]},
            "content is true": {"messages": [{"role": "user", "content": True}]},
            "content is an object": {"messages": [{"role": "user", "content": {"text": "x"}}]},
            "a content block is a string": {"messages": [{"role": "user", "content": ["hi"]}]},
            "a text block without text": {"messages": [_block({"type": "text"})]},
            "a text block whose text is a number": {
                "messages": [_block({"type": "text", "text": 5})]
            },
            "a text block whose text is null": {
                "messages": [_block({"type": "text", "text": None})]
            },
            "a text block whose text is a list": {
                "messages": [_block({"type": "text", "text": ["a"]})]
            },
            "a block without a type": {"messages": [_block({"text": "hi"})]},
            "a block whose type is a number": {"messages": [_block({"type": 7, "text": "hi"})]},
            "a block of an unknown type": {"messages": [_block({"type": "bogus", "text": "x"})]},
            "an image block whose source is text": {
                "messages": [_block({"type": "image", "source": "x"})]
            },
            "max_tokens is text": {"messages": hi, "max_tokens": "lots"},
            "max_tokens is 0": {"messages": hi, "max_tokens": 0},
            "max_tokens is negative": {"messages": hi, "max_tokens": -5},
            "max_tokens is a fraction": {"messages": hi, "max_tokens": 1.5},
            "max_tokens is true": {"messages": hi, "max_tokens": True},
            "system is a number": {"messages": hi, "system": 5},
            "a system block whose text is a number": {
                "messages": hi,
                "system": [{"type": "text", "text": 7}],
            },
            "stop_sequences is a string": {"messages": hi, "stop_sequences": "END"},
            "stop_sequences holds numbers": {"messages": hi, "stop_sequences": [1, 2]},
            "tools is an object": {"messages": hi, "tools": {}},
            "a tool is a number": {"messages": hi, "tools": [5]},
            "tool_choice is a string": {"messages": hi, "tool_choice": "auto"},
            "metadata is a list": {"messages": hi, "metadata": []},
            "thinking is a string": {"messages": hi, "thinking": "yes"},
            "temperature (refused by the API version)": {"messages": hi, "temperature": 0.5},
            "model (tokenq chooses it)": {"messages": hi, "model": "claude-opus-5-5"},
            "an unknown request field": {"messages": hi, "foo": 1},
        }
        out = [
            _Template(name, bad, _plus(b, {"request": json.dumps(value)}))
            for name, value in requests.items()
        ]
        texts = {
            "request is empty": "",
            "request is cut JSON": '{"messages": [',
            "request has trailing bytes": _request("hi") + " x",
            "request has NaN": _request("hi")[:-1] + ', "max_tokens": NaN}',
        }
        out += [_Template(name, bad, _plus(b, {"request": text})) for name, text in texts.items()]
        fields: dict[str, Fields] = {
            "deadline_ms is a word": {"deadline_ms": "soon"},
            "deadline_ms is empty": {"deadline_ms": ""},
            "deadline_ms is hex": {"deadline_ms": "0x10"},
            "cache is on": {"cache": "on"},
            "cache is OFF": {"cache": "OFF"},
            "cache is empty": {"cache": ""},
            "tier is unknown": {"tier": "gpt-9"},
            "tier is empty": {"tier": ""},
            "feature is empty": {"feature": ""},
            "id is empty": {"id": ""},
        }
        out += [_Template(name, bad, _plus(b, over)) for name, over in fields.items()]
        out += [
            _Template(
                "no feature", bad, lambda r: {k: v for k, v in b(r).items() if k != "feature"}
            ),
            _Template(
                "no request", bad, lambda r: {k: v for k, v in b(r).items() if k != "request"}
            ),
            _Template("only an unknown field", bad, lambda r: {"trace": "x"}),
        ]
        return out

    def deep(self) -> list[_Template]:
        b, bad = self.base, "malformed_job"
        hi = '[{"role":"user","content":"Hi"}]'
        bodies = {
            "metadata nested 3,000 arrays deep": f'{{"messages":{hi},"metadata":{{"a":'
            f"{_nested(DEEP, 'array')}}}}}",
            "a tool schema nested 3,000 objects deep": f'{{"messages":{hi},"tools":[{{"name":'
            f'"t","input_schema":{_nested(DEEP, "object")}}}]}}',
            "a tool_result nested 3,000 arrays deep": '{"messages":[{"role":"user","content":'
            '[{"type":"tool_result","tool_use_id":"t","content":'
            f"{_nested(DEEP, 'array')}}}]}}]}}",
            "the request itself nested 10,000 arrays deep": _nested(10_000, "array"),
            "a system block nested 3,000 arrays deep": f'{{"messages":{hi},"system":[{{"type":'
            f'"text","text":"x","citations":{_nested(DEEP, "array")}}}]}}',
        }
        return [_Template(name, bad, _plus(b, {"request": text})) for name, text in bodies.items()]

    def sizes(self) -> list[_Template]:
        b, big, over = self.base, "too_large", self.max + 10_000
        many = over // 8 + 1
        return [
            _Template(
                "request over max_entry_bytes",
                big,
                heavy=True,
                build=lambda r: b(r, request=_request("x" * over)),
            ),
            _Template(
                "an unknown field over max_entry_bytes",
                big,
                heavy=True,
                build=lambda r: b(r, trace="y" * over),
            ),
            _Template(
                "a tenant over max_entry_bytes",
                big,
                heavy=True,
                build=lambda r: b(r, tenant="t" * over),
            ),
            _Template(
                "an id over max_entry_bytes",
                big,
                heavy=True,
                with_id=False,
                build=lambda r: b(r, id="i" * over),
            ),
            _Template(
                f"{many:,} fields, over max_entry_bytes",
                big,
                heavy=True,
                build=lambda r: b(r) | {f"f{i:06}": "1" for i in range(many)},
            ),
        ]

    def reply_tos(self) -> list[_Template]:
        b, bad, p = self.base, "malformed_job", self.prefix
        targets = [
            f"{p}:deferred",
            f"{p}:usage",
            f"{p}:dead",
            f"{p}:jobs:normal",
            f"{p}:jobs:low",
            f"{p}:limits:claude-haiku-5-5",
            f"{p}:limits:claude-opus-5-5",
            f"{p}:result:fz-someone-else",
            f"{p}:batcher:lease",
            f"{p}:batches",
            f"{p}:control",
            f"{p}:",
            f"{p}:new-stream",
            *self.foreign,
        ]
        out = [
            _Template(f"reply_to {name}", bad, _plus(b, {"reply_to": name}), mentions="reply_to")
            for name in targets
        ]
        out.append(_Template("reply_to is empty", bad, lambda r: b(r, reply_to="")))
        return out

    def ids(self) -> list[_Template]:
        b, bad = self.base, "malformed_job"
        soon = self.now_ms + 120_000  # an entry id the streams will hand out soon
        shapes = [
            "1-0",
            "0-1",
            f"{soon}-0",
            f"{soon}-1",
            "99999999999999-5",
            f"normal:{soon}-0",
            f"low:{soon}-2",
            "high:1-0",
        ]
        return [
            _Template(
                f"an explicit id shaped like a default id: {shape}",
                bad,
                _plus(b, {"id": shape}),
                with_id=False,
            )
            for shape in shapes
        ]

    def others(self) -> list[_Template]:
        b = self.base
        names = {
            "an unknown feature": "nope",
            "a feature with a newline": "summarize\n",
            "a feature with NUL": "summa\x00rize",
            "a feature in capitals": "SUMMARIZE",
            "a feature of 5,000 characters": "f" * 5000,
        }
        out = [
            _Template(name, "unknown_feature", _plus(b, {"feature": feature}))
            for name, feature in names.items()
        ]
        out += [
            _Template("deadline_ms 1000 (passed)", "deadline_exceeded",
                      _plus(b, {"deadline_ms": "1000"})),
            _Template("deadline_ms -5 (not a unix time)", "malformed_job",
                      _plus(b, {"deadline_ms": "-5"})),
        ]  # fmt: skip
        return out


def _block(block: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": [block]}


def make_corpus(
    seed: int,
    entries: int,
    *,
    prefix: str,
    priorities: list[str],
    max_entry_bytes: int,
    now_ms: int,
) -> Corpus:
    """`entries` job entries of every kind above on every priority, in a seeded order, plus
    the jobs whose ids they reuse and two jobs to defer. Every template is used at least once;
    the rest are drawn at random, about half of them good jobs. The same arguments give the
    same corpus; deadlines and entry-id-shaped ids are relative to now_ms."""
    rng = random.Random(seed)
    builder = _Builder(prefix, max_entry_bytes, now_ms)
    templates = builder.templates()
    n = 0

    def case(t: _Template, priority: str) -> Case:
        nonlocal n
        n += 1
        fields: Fields = {"id": f"fz{seed}-{n}"} if t.with_id else {}
        fields.update(t.build(rng))
        reply = f"fuzzreply:{prefix}:{n}" if t.reply else None
        if reply:
            fields["reply_to"] = reply
        raw = {_b(k): _b(v) for k, v in fields.items()}
        return Case(t.name, priority, raw, t.expect, t.mentions, reply)

    slots: list[Case | tuple[Case, Case]] = [
        case(t, priorities[i % len(priorities)]) for i, t in enumerate(templates)
    ]
    good = [t for t in templates if t.expect == "ok"]
    light = [t for t in templates if t.expect != "ok" and not t.heavy]
    originals, reuses = _reuses(rng, seed, prefix, priorities)
    pairs = _same_fingerprint_pairs(rng, seed, priorities)
    while len(slots) + len(reuses) + 2 * len(pairs) < entries:
        pick = rng.choice(good) if rng.random() < 0.55 else rng.choice(light)
        slots.append(case(pick, rng.choice(priorities)))
    rng.shuffle(slots)
    extras: list[Case | tuple[Case, Case]] = [*reuses, *pairs]
    for extra in extras:  # a pair stays together: its two entries are in flight at once
        slots.insert(rng.randrange(len(slots) + 1), extra)
    cases = [c for slot in slots for c in (slot if isinstance(slot, tuple) else (slot,))]
    deferred = [
        Case(
            "deferred with 5,000 fields (a Lua unpack of them fails)",
            "normal",
            {
                b"id": f"fz{seed}-deferred-wide".encode(),
                b"feature": b"summarize",
                b"request": _request("Summarise: wide").encode(),
                **{f"w{i:04}".encode(): b"1" for i in range(5000)},
            },
            "ok",
        ),
        Case(
            "deferred plain job",
            "normal",
            {
                b"id": f"fz{seed}-deferred-plain".encode(),
                b"feature": b"summarize",
                b"request": _request("Summarise: plain").encode(),
            },
            "ok",
        ),
    ]
    return Corpus(seed, prefix, originals, deferred, cases, builder.foreign)


def _reuses(
    rng: random.Random, seed: int, prefix: str, priorities: list[str]
) -> tuple[list[Case], list[Case]]:
    """Four jobs submitted first, and entries reusing their ids once they have results: with
    another request, tenant or feature, without the tenant (duplicate_id, each with a reply
    stream to receive its error), and with the same fingerprint (the first result, no call)."""

    def job(n: int, feature: str, tenant: str | None, text: str) -> dict[bytes, bytes]:
        fields = {
            b"id": f"fz{seed}-orig-{n}".encode(),
            b"feature": feature.encode(),
            b"request": _request(text).encode(),
        }
        return fields | ({b"tenant": tenant.encode()} if tenant else {})

    bodies = [
        job(0, "summarize", "acme", "Summarise: first"),
        job(1, "summarize", "globex", "Summarise: second"),
        job(2, "classify_ticket", "acme", "Classify: third"),
        job(3, "summarize", "initech", "Summarise: fourth"),
    ]
    originals = [
        Case(f"original {n} (its id is reused)", priorities[n % len(priorities)], body, "ok")
        for n, body in enumerate(bodies)
    ]
    changed = [
        ("another request", bodies[0] | {b"request": _request("Summarise: not first").encode()}),
        ("another tenant", bodies[1] | {b"tenant": b"umbrella"}),
        ("another feature", bodies[2] | {b"feature": b"summarize"}),
        ("no tenant", {k: v for k, v in bodies[3].items() if k != b"tenant"}),
    ]
    reuses = []
    for k, (how, body) in enumerate(changed):
        reply = f"fuzzreply:{prefix}:dup-{k}"
        reuses.append(
            Case(
                f"a used id with {how}",
                rng.choice(priorities),
                body | {b"reply_to": reply.encode()},
                "duplicate_id",
                reply_to=reply,
            )
        )
    reuses.append(
        Case("a used id with the same fingerprint", rng.choice(priorities), dict(bodies[0]), "ok")
    )
    return originals, reuses


def _same_fingerprint_pairs(
    rng: random.Random, seed: int, priorities: list[str]
) -> list[tuple[Case, Case]]:
    """Two entries with one id and one fingerprint, submitted together: both in flight at
    once, they must make one call and share one result. One pair spans two streams."""
    pairs = []
    for k, (first, second) in enumerate([("normal", "normal"), ("high", "low"), ("low", "low")]):
        if first not in priorities or second not in priorities:
            first = second = rng.choice(priorities)
        body = {
            b"id": f"fz{seed}-twin-{k}".encode(),
            b"feature": b"summarize",
            b"tenant": b"acme",
            b"request": _request(f"Summarise: twin {k}").encode(),
        }
        name = "one id and fingerprint twice, in flight together"
        pairs.append((Case(name, first, body, "ok"), Case(name, second, dict(body), "ok")))
    return pairs
