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
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

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
    reply_to_pattern: str = ""


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


Word = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class AdaptiveConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How router.policy = "adaptive" learns from outcomes (worker.adaptive)."""

    # Share of a feature's jobs sent one tier below the chosen one, to learn whether it will do.
    explore_share: Annotated[float, msgspec.Meta(ge=0, le=0.5)] = 0.05
    # One-sided confidence of the Wilson bounds that prove a tier good or bad.
    confidence: Annotated[float, msgspec.Meta(ge=0.5, lt=1)] = 0.9
    # Answers (decayed) a tier needs counted before it can be proven good.
    min_samples: Count = 20
    # An answer counts half as much every half_life_s; in the recent counts (to notice a
    # drop at once) every recent_half_life_s.
    half_life_s: Annotated[int, msgspec.Meta(ge=1, le=30 * 86_400)] = 3600
    recent_half_life_s: Annotated[int, msgspec.Meta(ge=1, le=86_400)] = 60
    # How a feature's jobs are told apart into kinds, each learning its own tier: "bands" of
    # the estimated input tokens, or "signals" the request shows (worker.adaptive.kind_of).
    kinds: Literal["bands", "signals"] = "bands"
    # Kinds of job: input-length bands, name -> the fewest estimated input tokens of the band.
    bands: dict[Name, Annotated[int, msgspec.Meta(ge=0)]] = msgspec.field(
        default_factory=lambda: {"short": 0, "medium": 500, "long": 2000}
    )
    # With kinds = "signals": words that make a request harder (case-insensitive, found in
    # its messages); each one found moves the job one kind up.
    hard_words: Annotated[list[Word], msgspec.Meta(max_length=100)] = []
    # The price rule's doubt about a cheaper tier until min_samples of its answers are
    # counted: its pass rate starts as if it had failed this many times for each tier above
    # it, the doubt fading as answers come in (0: every tier starts even).
    step_down_doubt: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0
    feedback_ttl_s: Annotated[int, msgspec.Meta(ge=0)] = 86_400
    cache_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 1000


class RouterConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    default_tier: str = "sonnet"
    baseline_tier: str = "opus"
    max_escalations: Annotated[int, msgspec.Meta(ge=0, le=5)] = 1
    rules: list[RouteRule] = []
    classifier: ClassifierConfig = ClassifierConfig()
    policy: Literal["static", "adaptive"] = "static"
    adaptive: AdaptiveConfig = AdaptiveConfig()


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


class SemanticCacheConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A feature's semantic cache (worker.semantic): a rephrased question is answered from an
    earlier answer when its last user turn is at least `threshold` similar (cosine) and
    everything else about the request is identical."""

    # Cosine similarity of the last user turns at which an earlier answer is served. Raised
    # for a while by producers' `bad` verdicts on semantic hits (worker.semantic.trust).
    threshold: Annotated[float, msgspec.Meta(ge=0.5, lt=1)] = 0.92
    ttl_s: Annotated[int, msgspec.Meta(ge=1, le=30 * 86_400)] = 86_400
    # Entries kept per scope (the feature's shared scope, or one tenant's); the oldest go first.
    max_entries: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    # A `bad` verdict halves the room between threshold and 1; the penalty halves again every
    # trust_half_life_s, so the threshold comes back once the bad answers stop.
    trust_half_life_s: Annotated[int, msgspec.Meta(ge=60, le=30 * 86_400)] = 86_400


class FeatureConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    tier: str | None = None
    max_tokens: Count = 1024
    max_tokens_cap: Count | None = None
    max_input_tokens: Count | None = None
    input_overflow: Literal["reject", "truncate"] = "reject"
    limit_share: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    expect: Literal["text", "json"] = "text"
    # A JSON Schema the answer must validate against (expect = "json"): an inline table, or
    # the path of a JSON file relative to the config file; load_config replaces a path by the
    # schema it holds.
    expect_schema: dict[str, Any] | str | None = None
    expect_regex: str | None = None
    min_output_tokens: Count | None = None
    target_pass_rate: Annotated[float, msgspec.Meta(gt=0, lt=1)] | None = None
    # What a wrong answer costs you, in USD: the adaptive router picks the tier of least
    # expected cost (the call plus this times its share of wrong answers) instead.
    wrong_answer_usd: Positive | None = None
    max_tokens_learn: bool = False
    max_tokens_floor: Count = 16
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
    # Opt-in: answer a rephrased question from an earlier answer (README: Semantic cache).
    semantic_cache: SemanticCacheConfig | None = None


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


class EmbeddingsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where the semantic cache gets its vectors from (worker.embeddings)."""

    # "auto": Voyage AI when VOYAGE_API_KEY is set, else the simulator; "voyage"; "local" (a
    # static model2vec model on the CPU from local_path); "simulator".
    provider: Literal["auto", "voyage", "local", "simulator"] = "auto"
    model: Annotated[str, msgspec.Meta(min_length=1)] = "voyage-3.5-lite"
    # Length of the vectors asked for (Voyage's output_dimension: 256, 512, 1024 or 2048 for
    # the voyage-3.5 and -4 models); a local model gives its own.
    dimensions: Annotated[int, msgspec.Meta(ge=8, le=4096)] = 512
    voyage_url: str = "https://api.voyageai.com/v1"
    # A folder holding a model2vec model (config.json, model.safetensors, tokenizer.json),
    # relative to the config file; downloaded once by you, never fetched at run time.
    local_path: str = ""
    # The price of the embedded tokens (part of the job's cost_usd).
    usd_per_mtok: Price = 0.02
    timeout_s: Positive = 10.0
    # A last user turn longer than this is not looked up (nor embedded): FAQ-like questions
    # are short, and a long text would cost an embedding for a cache that never hits.
    max_chars: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 4000


class AlertsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Alerts out (worker.alerts): where they go and how often a condition may repeat."""

    webhook_url: str = ""  # "" = `tokenq alerts` only logs them
    period_s: Annotated[int, msgspec.Meta(ge=1)] = 3600
    dead_letter_burst: Count = 10
    dead_letter_window_s: Positive = 60.0


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
    alerts: AlertsConfig = AlertsConfig()
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
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
    """Validate an already-parsed TOML document; see load_config. Every problem is reported
    at once: a bad value is left out (its default stands in) so the rest, and the checks
    across sections, still run."""
    problems, cleaned = _problems(raw, Config, [])
    cfg: Config | None = None
    # A required key is missing when this fails: already a problem, and the checks across
    # sections need a whole config.
    try:
        cfg = msgspec.convert(cleaned, Config)
    except msgspec.ValidationError as exc:
        if not problems:  # a rule the walk above does not know: msgspec's own words
            problems.append(f"{exc}. Fix it in the config file.")
    if cfg is not None:
        cfg, schema_problems = _load_schemas(cfg, Path(where).parent)
        cfg = _resolve_local_path(cfg, Path(where).parent)
        problems += schema_problems + _cross_check(cfg)
    if len(problems) == 1:
        raise ConfigError(f"{where}: {problems[0]}")
    if problems:
        listed = "".join(f"\n  - {p}" for p in problems)
        raise ConfigError(f"{where}: {len(problems)} problems:{listed}")
    assert cfg is not None
    return cfg


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_BAD = object()  # stands for a value left out after its problem was noted


def _problems(value: Any, type_: Any, path: list[str]) -> tuple[list[str], Any]:
    """Every problem of `value` against `type_` at `path`, and the value with each bad part
    left out (_BAD when the value itself is bad). msgspec stops at its first error; this
    walks tables, their entries and lists of tables, and converts each leaf on its own."""
    struct = _struct_in(type_)
    plain = _unwrap(type_)
    if struct is not None and isinstance(value, dict):
        return _table_problems(value, struct, path)
    if get_origin(plain) is dict and isinstance(value, dict):
        key_type, value_type = get_args(plain)
        out: list[str] = []
        kept: dict[str, Any] = {}
        for key, item in value.items():
            bad_key, _ = _problems(key, key_type, [*path, str(key)])
            found, clean = _problems(item, value_type, [*path, str(key)])
            out += bad_key + found
            if clean is not _BAD and not bad_key:
                kept[key] = clean
        return out, kept
    if get_origin(plain) is list and isinstance(value, list):
        item_type = get_args(plain)[0]
        results = [_problems(v, item_type, [*path, str(n)]) for n, v in enumerate(value)]
        found = [p for problems, _ in results for p in problems]
        if found:  # else the list as a whole is checked below (its length, say)
            return found, [clean for _, clean in results if clean is not _BAD]
    try:
        msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        match = _AT.match(str(exc))
        what = match["what"] if match else str(exc)
        return [f"{_dotted(path)} = {value!r} is not allowed: {what}. Fix it in the config "
                "file."], _BAD  # fmt: skip
    return [], value


def _table_problems(
    value: dict[str, Any], struct: type[msgspec.Struct], path: list[str]
) -> tuple[list[str], Any]:
    fields = {f.name: f for f in msgspec.structs.fields(struct)}
    hints = get_type_hints(struct, include_extras=True)
    out: list[str] = []
    kept: dict[str, Any] = {}
    for key, item in value.items():
        if key not in fields:
            allowed = ", ".join(fields)
            out.append(f"unknown key {_dotted([*path, key])!r}. Allowed keys here: {allowed}. "
                       "Check the spelling.")  # fmt: skip
            continue
        found, clean = _problems(item, hints[key], [*path, key])
        out += found
        if clean is not _BAD:
            kept[key] = clean
    for name, f in fields.items():
        if f.required and name not in value:
            out.append(f"{_dotted([*path, name])} is required but missing. Add it.")
    return out, kept


def _unwrap(type_: Any) -> Any:
    """The type inside Annotated[...] and X | None."""
    while get_origin(type_) in (Annotated, Union, UnionType):
        type_ = next(a for a in get_args(type_) if a is not type(None))
    return type_


def _struct_in(type_: Any) -> type[msgspec.Struct] | None:
    plain = _unwrap(type_)
    if isinstance(plain, type) and issubclass(plain, msgspec.Struct):
        return plain
    return None


def _dotted(segments: list[str]) -> str:
    return ".".join(s if re.fullmatch(r"[\w-]+", s) else f'"{s}"' for s in segments) or "(top)"


def _cross_check(cfg: Config) -> list[str]:
    """Checks across sections: every name used is defined, URLs have a known form."""
    return (
        _check_names(cfg) + _check_router_budgets(cfg) + _check_urls(cfg) + _check_queue(cfg)
        + _check_batch(cfg) + _check_answers(cfg) + _check_adaptive(cfg)
        + _check_embeddings(cfg)
    )  # fmt: skip


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
    # Checked when the classifier is off too: turning it on must not be what breaks a config.
    if cfg.router.classifier.tier not in cfg.tiers:
        off = "" if cfg.router.classifier.enabled else " (router.classifier is off, for now)"
        out.append(
            f"router.classifier.tier = {cfg.router.classifier.tier!r} is not a tier; "
            f"defined: {tiers}{off}"
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
    if cfg.alerts.webhook_url and not re.match(r"^https?://.+", cfg.alerts.webhook_url):
        out.append(
            f"alerts.webhook_url = {cfg.alerts.webhook_url!r} is not allowed: use an http(s):// "
            'URL (a Slack incoming webhook, or any that takes {"text": ...}), or "" for none'
        )
    if not re.match(r"^(auto|https?://.+)$", cfg.anthropic.base_url):
        out.append(
            f'anthropic.base_url = {cfg.anthropic.base_url!r} is not allowed: use "auto" '
            "or an http(s):// URL"
        )
    return out


def _check_queue(cfg: Config) -> list[str]:
    pattern = cfg.queue.reply_to_pattern
    try:
        re.compile(pattern)
    except re.error as exc:
        return [
            f"queue.reply_to_pattern = {pattern!r} is not a regular expression ({exc}); "
            'e.g. "^replies:[a-z0-9-]+$", or "" to allow any stream outside the prefix'
        ]
    return []


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


def _check_learning(key: str, f: FeatureConfig, ceiling: int) -> list[str]:
    out: list[str] = []
    if f.max_tokens_floor > ceiling:
        out.append(
            f"{key}.max_tokens_floor = {f.max_tokens_floor} is over max_tokens_cap or "
            f"max_tokens ({ceiling}); lower the floor, or raise the cap"
        )
    if f.min_output_tokens is not None and f.max_tokens_floor < f.min_output_tokens:
        out.append(
            f"{key}.max_tokens_floor = {f.max_tokens_floor} is below its min_output_tokens "
            f"= {f.min_output_tokens}: a learnt max_tokens could cut every answer short; "
            "raise the floor"
        )
    return out


def _load_schemas(cfg: Config, base: Path) -> tuple[Config, list[str]]:
    """Each feature's expect_schema read from its file (a path relative to `base`, the config
    file's folder) and checked: valid JSON Schema, references only inside itself."""
    features, problems = dict(cfg.features), []
    for name, feature in cfg.features.items():
        schema, key = feature.expect_schema, f"features.{name}.expect_schema"
        if isinstance(schema, str):
            file = base / schema
            try:
                schema = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                problems.append(
                    f"{key} = {feature.expect_schema!r}: cannot read a JSON Schema from "
                    f"{str(file)!r} ({exc}); give the path of a JSON file, relative to the "
                    "config file, or an inline table"
                )
                continue
            if not isinstance(schema, dict):
                problems.append(f"{key}: {str(file)!r} holds no JSON object; a schema is one")
                continue
            features[name] = msgspec.structs.replace(feature, expect_schema=schema)
        if isinstance(schema, dict):
            problems += [f"{key}: {p}" for p in schema_problems(schema)]
    return msgspec.structs.replace(cfg, features=features), problems


def schema_problems(schema: dict[str, Any]) -> list[str]:
    """Why a JSON Schema cannot be used: not valid for its draft (its "$schema", else
    2020-12), or a "$ref" that does not point inside it (tokenq fetches nothing)."""
    # Imported here: jsonschema takes ~90 ms to import, which every CLI command would pay.
    from jsonschema import Draft202012Validator, SchemaError
    from jsonschema.validators import validator_for
    from referencing import Registry, Resource
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012

    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(the root)"
        return [
            f"not a valid JSON Schema at {where}: {exc.message[:200]}. See "
            "https://json-schema.org/understanding-json-schema/"
        ]
    root = Resource.from_contents(schema, default_specification=DRAFT202012)
    resolver = Registry().with_resource(SCHEMA_URI, root).resolver(SCHEMA_URI)
    out = []
    for ref in _refs(schema):
        try:
            if not ref.startswith("#"):
                raise Unresolvable(ref)
            resolver.lookup(ref)
        except Unresolvable:
            out.append(
                f"$ref {ref[:100]!r} does not point inside the schema; only references from "
                'its root such as "#/$defs/name" are allowed (tokenq fetches nothing)'
            )
    return out


SCHEMA_URI = "urn:tokenq:expect-schema"


def _refs(value: Any) -> list[str]:
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if not isinstance(value, dict):
        return []
    own = [v for k, v in value.items() if k in ("$ref", "$dynamicRef") and isinstance(v, str)]
    return own + [r for v in value.values() for r in _refs(v)]


def _check_answers(cfg: Config) -> list[str]:
    """A feature's answer checks and learnt max_tokens: each can be met."""
    out: list[str] = []
    for name, f in cfg.features.items():
        key = f"features.{name}"
        if f.expect_schema is not None and f.expect != "json":
            out.append(f'{key}.expect_schema needs {key}.expect = "json"; add it')
        if f.expect_regex is not None:
            try:
                re.compile(f.expect_regex)
            except re.error as exc:
                out.append(
                    f"{key}.expect_regex = {f.expect_regex!r} is not a regular expression: "
                    f"{exc} (Python re syntax)"
                )
        ceiling = f.max_tokens_cap or f.max_tokens
        if f.min_output_tokens is not None and f.min_output_tokens > ceiling:
            out.append(
                f"{key}.min_output_tokens = {f.min_output_tokens} is over the most an answer "
                f"may have ({ceiling}, max_tokens_cap or max_tokens); no answer could pass"
            )
        if f.max_tokens_learn:
            out += _check_learning(key, f, ceiling)
    return out


def _check_adaptive(cfg: Config) -> list[str]:
    out: list[str] = []
    a = cfg.router.adaptive
    for name, f in cfg.features.items():
        for key, value in (("target_pass_rate", f.target_pass_rate),
                           ("wrong_answer_usd", f.wrong_answer_usd)):  # fmt: skip
            if value is not None and f.tier is not None:
                out.append(
                    f"features.{name}.{key} has no effect: features.{name}.tier = "
                    f"{f.tier!r} fixes the tier; remove one of them"
                )
        if f.target_pass_rate is not None and f.wrong_answer_usd is not None:
            out.append(
                f"features.{name} sets both target_pass_rate and wrong_answer_usd: the "
                "adaptive router follows one rule per feature; remove one of them"
            )
    if cfg.router.policy == "adaptive" and all(
        f.target_pass_rate is None and f.wrong_answer_usd is None for f in cfg.features.values()
    ):
        out.append(
            'router.policy = "adaptive" but no feature sets target_pass_rate or '
            "wrong_answer_usd: set features.<name>.target_pass_rate (e.g. 0.98) or "
            "features.<name>.wrong_answer_usd on the features to route adaptively"
        )
    if a.recent_half_life_s >= a.half_life_s:
        out.append(
            f"router.adaptive.recent_half_life_s = {a.recent_half_life_s} must be shorter than "
            f"half_life_s = {a.half_life_s}: the recent counts are there to notice a drop sooner"
        )
    bounds = list(a.bands.values())
    if not bounds or bounds[0] != 0 or bounds != sorted(set(bounds)) or len(bounds) > 8:
        out.append(
            f"router.adaptive.bands = {a.bands!r}: give 1 to 8 bands, name = the fewest "
            "estimated input tokens, the first 0 and each larger than the one before, e.g. "
            "{short = 0, medium = 500, long = 2000}"
        )
    return out


def _resolve_local_path(cfg: Config, base: Path) -> Config:
    """embeddings.local_path made absolute against the config file's folder."""
    path = cfg.embeddings.local_path
    if not path or Path(path).is_absolute():
        return cfg
    embeddings = msgspec.structs.replace(cfg.embeddings, local_path=str(base.resolve() / path))
    return msgspec.structs.replace(cfg, embeddings=embeddings)


def _check_embeddings(cfg: Config) -> list[str]:
    e, out = cfg.embeddings, []
    used = [name for name, f in cfg.features.items() if f.semantic_cache is not None]
    if not re.match(r"^https?://.+", e.voyage_url):
        out.append(
            f"embeddings.voyage_url = {e.voyage_url!r} is not allowed: use an http(s):// URL"
        )
    if e.provider == "local" and not e.local_path:
        out.append(
            'embeddings.provider = "local" needs embeddings.local_path: the folder of a '
            "model2vec model you downloaded once (e.g. minishlab/potion-base-8M)"
        )
    # Checked only where it is used: the file may not exist on a machine that never looks up.
    if e.provider == "local" and e.local_path and used:
        folder = Path(e.local_path)
        if not (folder / "config.json").is_file():
            out.append(
                f"embeddings.local_path = {e.local_path!r} holds no model2vec model (no "
                f"config.json in {str(folder)!r}); download one there first, e.g. "
                '`python -c "from model2vec import StaticModel; '
                "StaticModel.from_pretrained('minishlab/potion-base-8M')"
                ".save_pretrained('PATH')\"`"
            )
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
