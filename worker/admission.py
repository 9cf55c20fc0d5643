"""The edge: what a job entry may contain, checked once, before anything else reads it.

Every byte of an entry is untrusted (any service in any language may XADD). `admit` either
returns typed values the rest of the worker can trust, or raises a JobRejected whose message
is a sentence a producer can act on. The checks, in order (the first that fails is the reason):

1. the size of the whole entry, names and values (queue.max_entry_bytes): `too_large`;
2. every field name and value is valid UTF-8 ("field `request` is not valid UTF-8"); the Redis
   client keeps undecodable bytes as surrogate escapes, so reading an entry never fails;
3. `feature` and `request` are there; the fields tokenq knows have the right form;
4. `id`: 1 to 255 printable characters without spaces (its reserved forms and its claim are
   Queue.begin_attempt's business, since they need Redis);
5. `reply_to`: a stream outside the key prefix, matching queue.reply_to_pattern when set
   (that it is not an existing key of another type is checked with Redis, Queue.reply_target);
6. `tenant`: at most 256 printable characters;
7. `feature` and `tier` are defined in config.toml;
8. `request`: a JSON object of the fields and content blocks the Messages API accepts, of the
   right types, within the API's limits (worker.api_request).

`dead_copy` bounds what a dead letter keeps of an entry (a prefix, length and SHA-256 of each
oversized value; a bounded number of fields).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from worker.api_request import EXAMPLE, parse_request
from worker.config import Config, FeatureConfig
from worker.contract import Job, Request, id_problem, shown
from worker.errors import MalformedJob, TooLarge, UnknownFeature

JOB_FIELDS = ("feature", "request", "id", "tenant", "tier", "reply_to", "deadline_ms", "cache")
MAX_TENANT = 256
MAX_REPLY_TO = 512
DEAD_VALUE_CHARS = 1024  # what a dead letter keeps of an oversized value
DEAD_OTHER_FIELDS = 32  # fields tokenq does not know, copied into a dead letter


@dataclass(frozen=True)
class Admitted:
    """A job that passed the edge: its fields, its request and its feature's config."""

    job: Job
    request: Request
    feature: FeatureConfig


def admit(fields: dict[str, str], cfg: Config) -> Admitted:
    """Check a job entry (see the module docstring). Raises JobRejected naming what to fix."""
    check_size(fields, cfg.queue.max_entry_bytes)
    check_utf8(fields)
    job = parse_fields(fields, cfg)
    feature = cfg.features.get(job.feature)
    if feature is None:
        raise UnknownFeature(
            f"feature {shown(job.feature, 80)} is not defined in config.toml [features]; "
            f"defined: {', '.join(sorted(cfg.features))}. Add it there or fix the producer."
        )
    if job.tier is not None and job.tier not in cfg.tiers:
        raise MalformedJob(
            f"tier {shown(job.tier, 80)} is not defined in config.toml [tiers]; "
            f"defined: {', '.join(cfg.tiers)}. Name one of them or leave `tier` out."
        )
    return Admitted(job, parse_request(job.request), feature)


def check_size(fields: dict[str, str], most: int) -> None:
    """TooLarge when the entry's names and values together are over `most` bytes."""
    size = sum(_bytes(k) + _bytes(v) for k, v in fields.items())
    if size > most:
        raise TooLarge(
            f"the job entry is {size:,} bytes, over queue.max_entry_bytes = {most:,}; shorten "
            "the request or raise the limit. The dead letter keeps the first "
            f"{DEAD_VALUE_CHARS} characters of each large field with its size and SHA-256 "
            "(field `truncated`), not the whole entry."
        )


def _bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape")) if not text.isascii() else len(text)


def check_utf8(fields: dict[str, str]) -> None:
    """MalformedJob naming the first field whose name or value is not valid UTF-8."""
    for name, value in fields.items():
        if not _is_utf8(name):
            raise MalformedJob(
                f"a field name is not valid UTF-8 ({shown(name, 60)}, undecodable bytes shown "
                "as U+FFFD); every field name and value of a job must be UTF-8 text. Fix the "
                "producer."
            )
        if not _is_utf8(value):
            raise MalformedJob(
                f"field `{_name(name)}` is not valid UTF-8 ({_first_bad(value)}); every field "
                "of a job must be UTF-8 text. Fix the producer (binary data goes base64 in a "
                "content block)."
            )


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_bad(value: str) -> str:
    raw = value.encode("utf-8", "surrogateescape")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"byte 0x{raw[exc.start]:02x} at offset {exc.start}"
    return "a lone surrogate"


def _name(name: str) -> str:
    """A field name inside backquotes in a sentence: short and escaped."""
    return shown(name, 60)[1:-1]


# -- the fields tokenq knows --


def parse_fields(fields: dict[str, str], cfg: Config) -> Job:
    """The known fields as a Job; MalformedJob naming the field that is wrong and how."""
    feature, request = fields.get("feature"), fields.get("request")
    if feature is None:
        raise MalformedJob(
            "the job has no `feature` field; every job names a feature of config.toml "
            "[features]. Add it to the XADD."
        )
    if not feature:
        raise MalformedJob("`feature` is empty; name a feature of config.toml [features].")
    if request is None:
        raise MalformedJob(
            "the job has no `request` field; it must be a JSON object of Messages API "
            f"parameters, e.g. {EXAMPLE}. Add it to the XADD."
        )
    job_id = fields.get("id")
    if job_id is not None and (problem := id_problem(job_id)) is not None:
        raise MalformedJob(f"{problem}. Fix the producer.")
    reply_to = fields.get("reply_to")
    if reply_to is not None and (problem := reply_to_problem(reply_to, cfg)) is not None:
        raise MalformedJob(f"{problem}. Fix the producer.")
    return Job(
        feature=feature, request=request, id=job_id, tenant=_tenant(fields.get("tenant")),
        tier=_tier(fields.get("tier")), reply_to=reply_to,
        deadline_ms=_deadline(fields.get("deadline_ms")), cache=_cache(fields.get("cache")),
    )  # fmt: skip


def _tenant(value: str | None) -> str | None:
    if not value:
        return None  # an empty tenant is no tenant
    if len(value) > MAX_TENANT or not value.isprintable():
        raise MalformedJob(
            f"`tenant` {shown(value, 60)} is not allowed: at most {MAX_TENANT} printable "
            "characters (no control characters or line breaks). Fix the producer."
        )
    return value


def _tier(value: str | None) -> str | None:
    if value == "":
        raise MalformedJob("`tier` is empty; name a tier of config.toml [tiers] or leave it out.")
    return value


def _deadline(value: str | None) -> int | None:
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,16}", value):
        raise MalformedJob(
            f"`deadline_ms` {shown(value, 40)} is not a unix time in milliseconds (a whole "
            "number such as 1763830000000). Fix the producer or leave it out."
        )
    return int(value)


def _cache(value: str | None) -> Literal["off"] | None:
    if value is None:
        return None
    if value != "off":
        raise MalformedJob(
            f'`cache` {shown(value, 40)} is not allowed: only "off" (no response cache or '
            "de-duplication for this job). Fix the producer or leave it out."
        )
    return "off"


def reply_to_problem(value: str, cfg: Config) -> str | None:
    """Why `value` cannot be a reply_to stream (a sentence), or None."""
    prefix = cfg.prefix
    if not value:
        return "`reply_to` is empty; name a stream of yours or leave it out"
    if len(value) > MAX_REPLY_TO or not value.isprintable():
        return (
            f"`reply_to` {shown(value, 60)} is not allowed: at most {MAX_REPLY_TO} printable "
            "characters"
        )
    if value == prefix or value.startswith(prefix + ":"):
        return (
            f"`reply_to` {shown(value, 60)} names one of tokenq's own keys (prefix "
            f"{prefix!r}); results go to a stream of yours outside it, e.g. 'replies:<service>'"
        )
    pattern = cfg.queue.reply_to_pattern
    if pattern and not re.fullmatch(pattern, value):
        return (
            f"`reply_to` {shown(value, 60)} does not match queue.reply_to_pattern "
            f"{pattern!r}; name a stream that does"
        )
    return None


def reply_to_of(fields: dict[str, str], cfg: Config) -> str | None:
    """The job's reply_to when it may be written to (any job, rejected ones too), else None."""
    value = fields.get("reply_to")
    if value is None or not _is_utf8(value) or reply_to_problem(value, cfg) is not None:
        return None
    return value


# -- what a dead letter keeps --


def dead_copy(fields: dict[str, str], *, too_large: bool) -> dict[str, str]:
    """The job's own fields for its dead letter, bounded: the fields tokenq knows in full
    (cut like the others when the entry was too large), at most DEAD_OTHER_FIELDS others;
    a cut value keeps its first DEAD_VALUE_CHARS characters, and `truncated` (JSON) gives its
    length in bytes and SHA-256; `dropped_fields` counts fields left out. Undecodable bytes
    are kept as they came (the Redis client writes them back)."""
    out: dict[str, str] = {}
    cut: dict[str, dict[str, Any]] = {}
    others = dropped = 0
    for name, value in fields.items():
        known = name in JOB_FIELDS
        if not known:
            if others >= DEAD_OTHER_FIELDS or len(name) > 256:
                dropped += 1
                continue
            others += 1
        if (too_large or not known) and len(value) > DEAD_VALUE_CHARS:
            raw = value.encode("utf-8", "surrogateescape")
            cut[_name(name)] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
            value = value[:DEAD_VALUE_CHARS]
        out[name] = value
    if cut:
        out["truncated"] = json.dumps(cut, sort_keys=True)
    if dropped:
        out["dropped_fields"] = str(dropped)
    return out
