"""config.toml decoded into typed, frozen Structs.

`load_config()` is the one way in. Every error names the key, the bad value and what is allowed,
because msgspec's own text (``Expected `int` >= 1 - at `$.queue.max_attempts` ``) names neither
the file nor the value. Unknown keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import msgspec

from worker.errors import ConfigError

Positive = Annotated[float, msgspec.Meta(gt=0)]
Price = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]+$")]

DEFAULT_PATH = "config.toml"


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class RedisConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str = "embedded"
    data_dir: str = ".tokenq/valkey"
    embedded_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 6399
    max_connections: Annotated[int, msgspec.Meta(ge=4, le=10_000)] = 64


class AnthropicConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    base_url: str = "auto"
    simulator_url: str = "http://127.0.0.1:8787"
    timeout_s: Positive = 120.0
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 0


class QueueConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    priorities: Annotated[list[Name], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["high", "normal", "low"]
    )
    visibility_timeout_s: Positive = 60.0
    max_attempts: Count = 5
    fair_every: Annotated[int, msgspec.Meta(ge=2)] = 10
    max_entry_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1_048_576
    result_ttl_s: Count = 86_400
    usage_maxlen: Annotated[int, msgspec.Meta(ge=1000)] = 1_000_000
    retry_base_s: Positive = 0.5
    retry_max_s: Positive = 30.0


class WorkerConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    processes: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 64
    grace_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    block_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 1000


class RouteRule(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One rule of [[router.rules]]: every condition given must hold; the first match wins."""

    tier: str
    features: list[str] | None = None
    min_input_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_input_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    keywords: list[Annotated[str, msgspec.Meta(min_length=1)]] | None = None
    name: str = ""


class ClassifierConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The optional cheap classifier call that picks a tier when no rule matched."""

    enabled: bool = False
    tier: str = "haiku"
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=64)] = 5
    max_chars: Annotated[int, msgspec.Meta(ge=100)] = 4000
    cache_ttl_s: Count = 86_400


class RouterConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    default_tier: str = "sonnet"
    baseline_tier: str = "opus"
    max_escalations: Annotated[int, msgspec.Meta(ge=0, le=5)] = 1
    rules: list[RouteRule] = []
    classifier: ClassifierConfig = ClassifierConfig()


class BudgetsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    timezone: str = "UTC"
    alert_at: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    estimate_margin: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.2
    tenant_daily_requests: Count | None = None
    tenant_daily_usd: Positive | None = None


class BreakersConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    fail_max: Count = 5
    reset_timeout_s: Positive = 30.0
    half_open_probes: Count = 2
    success_threshold: Count = 2
    sync_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 200


class LongContextPrices(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Prices that replace the normal ones for a request whose prompt is over the threshold."""

    above_prompt_tokens: Count
    input_usd_per_mtok: Price
    output_usd_per_mtok: Price
    cache_write_5m_usd_per_mtok: Price
    cache_write_1h_usd_per_mtok: Price
    cache_read_usd_per_mtok: Price


class RateLimits(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A model's API rate limits: requests, input tokens and output tokens per minute."""

    rpm: Count
    itpm: Count
    otpm: Count


class LimitsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    mode: Literal["fleet", "local", "off"] = "fleet"
    target: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.98
    priority_hold_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 2000
    smooth_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 60.0
    learn_ttl_s: Positive = 300.0


class ModelConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    input_usd_per_mtok: Price
    output_usd_per_mtok: Price
    cache_write_5m_usd_per_mtok: Price
    cache_write_1h_usd_per_mtok: Price
    cache_read_usd_per_mtok: Price
    batch_discount: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    long_context: LongContextPrices | None = None
    limits: RateLimits | None = None
    min_cache_tokens: Count = 1024


class FeatureConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    tier: str | None = None
    max_tokens: Count = 1024
    max_tokens_cap: Count | None = None
    max_input_tokens: Count | None = None
    input_overflow: Literal["reject", "truncate"] = "reject"
    limit_share: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    expect: Literal["text", "json"] = "text"
    daily_usd: Positive | None = None
    monthly_usd: Positive | None = None
    budget_policy: Literal["reject", "defer", "downgrade"] = "reject"
    tenant_daily_requests: Count | None = None
    tenant_daily_usd: Positive | None = None
    breaker_policy: Literal["defer", "downgrade", "fail"] = "defer"
    prompt_cache: Literal["auto", "5m", "1h", "off"] = "auto"
    response_cache_ttl_s: Annotated[int, msgspec.Meta(ge=0)] = 0
    response_cache_scope: Literal["tenant", "shared"] = "tenant"
    dedupe: bool = False


WINDOW = r"^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$"


class BatchConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Batch windows: which priorities go to Message Batches, when, and how big (batcher.py)."""

    priorities: list[Name] = msgspec.field(default_factory=lambda: ["low"])
    flush_interval_s: Positive = 60.0
    windows: list[Annotated[str, msgspec.Meta(pattern=WINDOW)]] = []
    timezone: str = "UTC"
    max_requests: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10_000
    max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * 1024 * 1024)] = 64 * 1024 * 1024
    completion_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 86_400.0
    poll_s: Positive = 10.0
    retry: Literal["batch", "realtime"] = "batch"
    lease_s: Annotated[float, msgspec.Meta(ge=0.1, le=600)] = 15.0


class ReportConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Rollups of job outcomes for `tokenq report`, the metrics and the dashboard (rollups.py)."""

    retention_days: Annotated[int, msgspec.Meta(ge=1, le=3660)] = 90
    tenants_per_hour: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 100


class MetricsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """`tokenq metrics`: the Prometheus exporter (metrics.py)."""

    tenant_labels: bool = False


class Config(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    prefix: Annotated[str, msgspec.Meta(min_length=1)] = "tokenq"
    redis: RedisConfig = RedisConfig()
    anthropic: AnthropicConfig = AnthropicConfig()
    queue: QueueConfig = QueueConfig()
    worker: WorkerConfig = WorkerConfig()
    router: RouterConfig = RouterConfig()
    limits: LimitsConfig = LimitsConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    breakers: BreakersConfig = BreakersConfig()
    batch: BatchConfig = BatchConfig()
    report: ReportConfig = ReportConfig()
    metrics: MetricsConfig = MetricsConfig()
    tiers: dict[str, str] = {}
    models: dict[str, ModelConfig] = {}
    features: dict[str, FeatureConfig] = {}


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: the argument, else $TOKENQ_CONFIG, else ./config.toml."""
    return Path(path or os.environ.get("TOKENQ_CONFIG") or DEFAULT_PATH)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file. Raises ConfigError with a sentence a person can act on.

    `redis.data_dir` comes back absolute, resolved against the file's folder.
    """
    file = config_path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(file)!r} does not exist; pass --config PATH or set TOKENQ_CONFIG"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    cfg = parse_config(raw, where=str(file))
    data_dir = (file.resolve().parent / cfg.redis.data_dir).resolve()
    return msgspec.structs.replace(
        cfg, redis=msgspec.structs.replace(cfg.redis, data_dir=str(data_dir))
    )


def parse_config(raw: dict[str, Any], where: str = DEFAULT_PATH) -> Config:
    """Validate an already-parsed TOML document; see load_config."""
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {_explain(str(exc), raw)}") from None
    problems = _cross_check(cfg)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return cfg


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_SEGMENT = re.compile(r"\.(\w+)|\[(?:'([^']*)'|\"([^\"]*)\"|(\d+))\]")


def _explain(message: str, raw: dict[str, Any]) -> str:
    """Turn msgspec's error text into one naming the key, the value and what is allowed."""
    what, segments = _locate(message, raw)
    unknown = re.match(r"Object contains unknown field `(.+)`", what)
    if unknown:
        allowed = ", ".join(_fields_at(segments))
        key = _dotted([*segments, unknown[1]])
        return f"unknown key {key!r}. Allowed keys here: {allowed}. Check the spelling."
    missing = re.match(r"Object missing required field `(.+)`", what)
    if missing:
        return f"{_dotted([*segments, missing[1]])} is required but missing. Add it."
    value = _value_at(raw, segments)
    return f"{_dotted(segments)} = {value!r} is not allowed: {what}. Fix it in the config file."


def _locate(message: str, raw: dict[str, Any]) -> tuple[str, list[str]]:
    """Split msgspec's text into (what went wrong, path segments), naming hidden dict keys.

    msgspec writes a dict key as `[...]`; the entries of that dict are validated again one by
    one to find the key whose value failed.
    """
    match = _AT.match(message)
    assert match is not None  # the pattern matches any string
    what, path = match["what"], match["path"] or ""
    head, hidden, tail = path.partition("[...]")
    if not hidden:
        return what, _segments(path)
    prefix = _segments(head)
    value_type = _type_at([*prefix, "*"])
    for key, value in (_value_at(raw, prefix) or {}).items():
        try:
            msgspec.convert(value, value_type)
        except msgspec.ValidationError as exc:
            inner_what, inner = _locate(str(exc), value)
            return inner_what, [*prefix, key, *inner]
    return what, [*prefix, *_segments(tail)]


def _segments(path: str) -> list[str]:
    return [next(g for g in m.groups() if g is not None) for m in _SEGMENT.finditer(path)]


def _dotted(segments: list[str]) -> str:
    return ".".join(s if re.fullmatch(r"[\w-]+", s) else f'"{s}"' for s in segments) or "(top)"


def _value_at(raw: Any, segments: list[str]) -> Any:
    for seg in segments:
        raw = raw[int(seg)] if isinstance(raw, list) else raw.get(seg)
    return raw


def _fields_at(segments: list[str]) -> list[str]:
    """The keys the Struct at this path accepts (for the unknown-key message)."""
    type_ = _type_at(segments)
    if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
        return list(type_.__struct_fields__)
    return []


def _type_at(segments: list[str]) -> Any:
    """The declared type at a path of keys; a dict key or list index steps into its values."""
    type_: Any = Config
    for seg in segments:
        if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
            type_ = get_type_hints(type_, include_extras=True)[seg]
        else:
            type_ = get_args(type_)[-1]
        while get_origin(type_) not in (None, dict, list):  # unwrap Annotated and Optional
            type_ = next(a for a in get_args(type_) if a is not type(None))
    return type_


def _cross_check(cfg: Config) -> list[str]:
    """Checks across sections: every name used is defined, URLs have a known form."""
    return _check_names(cfg) + _check_router_budgets(cfg) + _check_urls(cfg) + _check_batch(cfg)


def _check_names(cfg: Config) -> list[str]:
    out: list[str] = []
    tiers = ", ".join(cfg.tiers) or "(none)"
    if not cfg.tiers:
        out.append('[tiers] is empty; name at least one tier, e.g. haiku = "claude-haiku-5-5"')
    for tier, model in cfg.tiers.items():
        if model not in cfg.models:
            out.append(
                f'tiers.{tier} = {model!r} has no prices: add a [models."{model}"] table '
                f"(defined models: {', '.join(cfg.models) or '(none)'})"
            )
    for key in ("default_tier", "baseline_tier"):
        value = getattr(cfg.router, key)
        if value not in cfg.tiers:
            out.append(f"router.{key} = {value!r} is not a tier; defined tiers: {tiers}")
    for name, feature in cfg.features.items():
        if feature.tier is not None and feature.tier not in cfg.tiers:
            out.append(f"features.{name}.tier = {feature.tier!r} is not a tier; defined: {tiers}")
    if not cfg.features:
        out.append("[features] is empty; jobs name a feature, so define at least one")
    if len(set(cfg.queue.priorities)) != len(cfg.queue.priorities):
        out.append(f"queue.priorities = {cfg.queue.priorities!r} names a priority twice")
    return out


def _check_router_budgets(cfg: Config) -> list[str]:
    out: list[str] = []
    tiers = ", ".join(cfg.tiers) or "(none)"
    for name, feature in cfg.features.items():
        cap = feature.max_tokens_cap
        if cap is not None and cap < feature.max_tokens:
            out.append(
                f"features.{name}.max_tokens_cap = {cap} is below its max_tokens = "
                f"{feature.max_tokens}; raise the cap or lower max_tokens"
            )
    for n, rule in enumerate(cfg.router.rules):
        if rule.tier not in cfg.tiers:
            out.append(f"router.rules[{n}].tier = {rule.tier!r} is not a tier; defined: {tiers}")
        for name in rule.features or []:
            if name not in cfg.features:
                out.append(f"router.rules[{n}].features names {name!r}, which is not in [features]")
    if cfg.router.classifier.enabled and cfg.router.classifier.tier not in cfg.tiers:
        out.append(
            f"router.classifier.tier = {cfg.router.classifier.tier!r} is not a tier; "
            f"defined: {tiers}"
        )
    try:
        zoneinfo.ZoneInfo(cfg.budgets.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        out.append(
            f"budgets.timezone = {cfg.budgets.timezone!r} is not a time zone; use an IANA "
            'name such as "UTC" or "Europe/Berlin"'
        )
    return out


def _check_urls(cfg: Config) -> list[str]:
    out: list[str] = []
    if not re.match(r"^(embedded|rediss?://.+|unix://.+)$", cfg.redis.url):
        out.append(
            f'redis.url = {cfg.redis.url!r} is not allowed: use "embedded", '
            "redis://[user:password@]host:port/db, rediss://... (TLS) or unix:///path"
        )
    if not re.match(r"^(auto|https?://.+)$", cfg.anthropic.base_url):
        out.append(
            f'anthropic.base_url = {cfg.anthropic.base_url!r} is not allowed: use "auto" '
            "or an http(s):// URL"
        )
    return out


def _check_batch(cfg: Config) -> list[str]:
    out: list[str] = []
    b, priorities = cfg.batch, cfg.queue.priorities
    for name in b.priorities:
        if name not in priorities:
            out.append(
                f"batch.priorities names {name!r}, which is not in queue.priorities "
                f"({', '.join(priorities)}); name one of those, or [] for no batching"
            )
    if priorities and set(priorities) <= set(b.priorities):
        out.append(
            f"batch.priorities = {b.priorities!r} takes every priority; leave at least one for "
            "realtime jobs (usually the highest)"
        )
    try:
        zoneinfo.ZoneInfo(b.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        out.append(
            f"batch.timezone = {b.timezone!r} is not a time zone; use an IANA name such as "
            '"UTC" or "Europe/Berlin"'
        )
    for window in b.windows:
        start, _, end = window.partition("-")
        if start == end:
            out.append(f'batch.windows has {window!r}, which is empty; e.g. "01:00-06:00"')
    return out


def with_settings(text: str, settings: dict[str, Any]) -> str:
    """A config file's TOML text with `key = value` lines replaced (keys written
    `section.key`); a key the file does not have is added under its section's header (the
    section is added if need be). For tests, benchmarks and tools that derive a config."""
    lines = text.splitlines()
    section = ""
    seen: set[str] = set()
    headers: dict[str, int] = {}
    for n, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped.strip("[]")
            headers[section] = n
            continue
        name = stripped.split("=", 1)[0].strip()
        dotted = f"{section}.{name}" if section else name
        if "=" in stripped and not stripped.startswith("#") and dotted in settings:
            lines[n] = f"{name} = {toml_value(settings[dotted])}"
            seen.add(dotted)
    for dotted in sorted(set(settings) - seen, key=len, reverse=True):
        head, _, name = dotted.rpartition(".")
        if not head:
            raise ConfigError(f"top-level key {dotted!r} is not in the config text")
        line = f"{name} = {toml_value(settings[dotted])}"
        if head in headers:
            lines.insert(headers[head] + 1, line)
            headers = {h: i + (i > headers[head]) for h, i in headers.items()}
        else:
            lines += ["", f"[{head}]", line]
            headers[head] = len(lines) - 2
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """A Python value as a TOML value (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)
