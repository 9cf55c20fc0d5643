"""The Admin API's usage and cost reports, answered from the simulator's ledger.

    GET /v1/organizations/usage_report/messages
        platform.claude.com/docs/en/api/admin/usage_report/retrieve_messages
    GET /v1/organizations/cost_report
        platform.claude.com/docs/en/api/admin/cost_report
    (the docs mark both "legacy" in favour of /v1/organizations/analytics/*, and still
    document them; the usage & cost guide: platform.claude.com/docs/en/build-with-claude/
    usage-cost-api; query and response fields as in anthropics/claude-cookbooks
    observability/usage_cost_api.ipynb)

Requests: an `x-api-key` (the API wants an Admin key, `sk-ant-admin...`; the simulator takes
any) and `anthropic-version`. Query: `starting_at` (RFC 3339, required; snapped to the start
of its minute, hour or day in UTC), `ending_at` (buckets end before it), `bucket_width` (`1d`
default; `1h` and `1m` for usage only), `limit` (buckets per page: usage 7/31 by day, 24/168 by
hour, 60/1440 by minute, default/most; cost 7/31), `page` (the previous answer's
`next_page`), `group_by[]` (usage: `model`, `service_tier`, `context_window`, and the others
the API has, which the simulator, with one key and one workspace, answers with null; cost:
`description`, `workspace_id`), and the filters `models[]`, `service_tiers[]`,
`context_window[]` (usage).

Answers: `{"data": [{"starting_at", "ending_at", "results": [...]}], "has_more",
"next_page"}`; a bucket without usage has no results. A usage row holds
`uncached_input_tokens`, `cache_creation` (`ephemeral_1h_input_tokens`,
`ephemeral_5m_input_tokens`), `cache_read_input_tokens`, `output_tokens`, `server_tool_use`
and its group-by fields (null when not grouped). A cost row holds `amount` in the lowest
currency unit as a decimal string ("123.45" in "USD" is $1.23; the simulator gives more
decimals than cents, so sums can be compared exactly), `currency` "USD", and with
`description` grouped one row per model, service tier, price band and token type:
`cost_type` "tokens", `token_type`, `model`, `service_tier`, `context_window`, `description`.
The simulator's long-context band (Haiku 5.5's prompts over 100k tokens) is reported as
`context_window` "200k-1M", the API's only long-context bucket.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Generic, TypeVar

import msgspec
from aiohttp import web

from simulator import validate
from simulator.clock import Clock
from simulator.errors import ApiError
from simulator.ledger import Ledger, Minute, ModelTotals
from simulator.pricing import BATCH_FACTOR, PRICES, Prices

USAGE_PATH = "/v1/organizations/usage_report/messages"
COST_PATH = "/v1/organizations/cost_report"
WIDTH_S = {"1d": 86_400, "1h": 3_600, "1m": 60}
USAGE_LIMITS = {"1d": (7, 31), "1h": (24, 168), "1m": (60, 1440)}  # (default, most)
COST_LIMITS = {"1d": (7, 31)}
USAGE_GROUPS = ("api_key_id", "workspace_id", "model", "service_tier", "context_window",
                "inference_geo", "speed", "account_id", "service_account_id")  # fmt: skip
COST_GROUPS = ("workspace_id", "description")
TOKEN_TYPES = {  # token_type -> (the price it is billed at, in a description)
    "uncached_input_tokens": ("input", "Input Tokens"),
    "cache_creation.ephemeral_5m_input_tokens": ("write_5m", "Cache Write (5m)"),
    "cache_creation.ephemeral_1h_input_tokens": ("write_1h", "Cache Write (1h)"),
    "cache_read_input_tokens": ("read", "Cache Read"),
    "output_tokens": ("output", "Output Tokens"),
}

Renderer = Callable[[ApiError], web.Response]


class CacheCreation(msgspec.Struct):
    ephemeral_1h_input_tokens: int = 0
    ephemeral_5m_input_tokens: int = 0


class ServerToolUse(msgspec.Struct):
    web_search_requests: int = 0


class UsageRow(msgspec.Struct, kw_only=True):
    uncached_input_tokens: int = 0
    cache_creation: CacheCreation = msgspec.field(default_factory=CacheCreation)
    cache_read_input_tokens: int = 0
    output_tokens: int = 0
    server_tool_use: ServerToolUse = msgspec.field(default_factory=ServerToolUse)
    api_key_id: str | None = None
    workspace_id: str | None = None
    model: str | None = None
    service_tier: str | None = None
    context_window: str | None = None
    inference_geo: str | None = None


class CostRow(msgspec.Struct, kw_only=True):
    amount: str
    currency: str = "USD"
    cost_type: str | None = None
    token_type: str | None = None
    description: str | None = None
    model: str | None = None
    service_tier: str | None = None
    context_window: str | None = None
    inference_geo: str | None = None
    workspace_id: str | None = None


Row = TypeVar("Row", UsageRow, CostRow)


class Bucket(msgspec.Struct, Generic[Row]):
    starting_at: str
    ending_at: str
    results: list[Row]


class Report(msgspec.Struct, Generic[Row]):
    data: list[Bucket[Row]]
    has_more: bool
    next_page: str | None


class Query(msgspec.Struct, frozen=True, kw_only=True):
    """A report request's query, checked."""

    start_s: int
    end_s: int  # exclusive; now when not given
    width_s: int
    limit: int
    groups: frozenset[str]
    models: frozenset[str]
    tiers: frozenset[str]
    windows: frozenset[str]


def add_routes(app: web.Application, ledger: Callable[[], Ledger], clock: Clock,
               error_response: Renderer) -> None:  # fmt: skip
    """GET the usage and cost reports of the simulator's current ledger (`ledger()`: POST
    /_sim/reset replaces it)."""

    async def usage(request: web.Request) -> web.Response:
        try:
            validate.check_headers(request.headers)
            query = parse_query(request.query, USAGE_LIMITS, USAGE_GROUPS, clock())
            report = usage_report(ledger(), query)
        except ApiError as exc:
            return error_response(exc)
        return _json(report)

    async def cost(request: web.Request) -> web.Response:
        try:
            validate.check_headers(request.headers)
            query = parse_query(request.query, COST_LIMITS, COST_GROUPS, clock())
            report = cost_report(ledger(), query)
        except ApiError as exc:
            return error_response(exc)
        return _json(report)

    app.router.add_route("GET", USAGE_PATH, usage)
    app.router.add_route("GET", COST_PATH, cost)


def _json(report: Report[UsageRow] | Report[CostRow]) -> web.Response:
    return web.Response(body=msgspec.json.encode(report), content_type="application/json")


def parse_query(
    q: Any, limits: dict[str, tuple[int, int]], groups: tuple[str, ...], now: float
) -> Query:
    """The report query of a request; raises ApiError 400 naming the parameter."""
    width = q.get("bucket_width", "1d")
    if width not in limits:
        raise ApiError(400, f"bucket_width: Input should be {' or '.join(map(repr, limits))}")
    width_s = WIDTH_S[width]
    if "starting_at" not in q:
        raise ApiError(400, "starting_at: Field required (an RFC 3339 time)")
    start = _time(q["starting_at"], "starting_at") // width_s * width_s
    if q.get("page"):
        start = _page_start(q["page"])
    end = _time(q["ending_at"], "ending_at") if "ending_at" in q else int(now)
    default, most = limits[width]
    limit = _whole(q.get("limit", str(default)), "limit", 1, most)
    wanted = frozenset(_all(q, "group_by"))
    unknown = wanted - set(groups)
    if unknown:
        raise ApiError(400, f"group_by: {sorted(unknown)[0]!r} is not one of {', '.join(groups)}")
    return Query(
        start_s=start, end_s=end, width_s=width_s, limit=limit, groups=wanted,
        models=frozenset(_all(q, "models")), tiers=frozenset(_all(q, "service_tiers")),
        windows=frozenset(_all(q, "context_window")),
    )  # fmt: skip


def _all(q: Any, name: str) -> list[str]:
    return [*q.getall(f"{name}[]", []), *q.getall(name, [])]


def _time(text: str, name: str) -> int:
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, f"{name}: {text!r} is not an RFC 3339 time") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    return int(at.timestamp())


def _whole(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(400, f"{name}: Input should be a whole number from {low} to {high}")
    return value


def _rfc3339(unix_s: int) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _page_start(page: str) -> int:
    """A `next_page` token back into the start of its bucket (the token is base64 of it)."""
    try:
        return _time(base64.b64decode(page.removeprefix("page_")).decode(), "page")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, f"page: {page!r} is not a next_page token of this report") from None


def _buckets(query: Query) -> tuple[list[tuple[int, int]], str | None]:
    """The (start, end) of each bucket of this page, and the next page's token."""
    out: list[tuple[int, int]] = []
    start = query.start_s
    while len(out) < query.limit and start < query.end_s:
        out.append((start, start + query.width_s))
        start += query.width_s
    more = start < query.end_s
    token = "page_" + base64.b64encode(_rfc3339(start).encode()).decode() if more else None
    return out, token


def _window(m: Minute) -> str:
    return "200k-1M" if m.long_context else "0-200k"


def _in(query: Query, m: Minute, start: int, end: int) -> bool:
    return (
        start <= m.start_s < min(end, query.end_s)
        and (not query.models or m.model in query.models)
        and (not query.tiers or m.service_tier in query.tiers)
        and (not query.windows or _window(m) in query.windows)
    )


def usage_report(ledger: Ledger, query: Query) -> Report[UsageRow]:
    """GET /v1/organizations/usage_report/messages from the ledger's per-minute records."""
    spans, token = _buckets(query)
    data: list[Bucket[UsageRow]] = []
    for start, end in spans:
        rows: dict[tuple[str | None, ...], UsageRow] = {}
        for m, t in ledger.minutes.items():
            if not _in(query, m, start, end):
                continue
            key = (
                m.model if "model" in query.groups else None,
                m.service_tier if "service_tier" in query.groups else None,
                _window(m) if "context_window" in query.groups else None,
            )
            row = rows.get(key)
            if row is None:
                row = rows[key] = UsageRow(model=key[0], service_tier=key[1], context_window=key[2])
            _add_usage(row, t)
        data.append(Bucket(_rfc3339(start), _rfc3339(end), list(rows.values())))
    return Report(data, token is not None, token)


def _add_usage(row: UsageRow, t: ModelTotals) -> None:
    row.uncached_input_tokens += t.input_tokens
    row.cache_creation.ephemeral_5m_input_tokens += t.ephemeral_5m_input_tokens
    row.cache_creation.ephemeral_1h_input_tokens += t.ephemeral_1h_input_tokens
    row.cache_read_input_tokens += t.cache_read_input_tokens
    row.output_tokens += t.output_tokens


def cost_report(ledger: Ledger, query: Query) -> Report[CostRow]:
    """GET /v1/organizations/cost_report: each token type of the ledger's records at its
    price (band, batch), in cents, summed exactly."""
    spans, token = _buckets(query)
    by_description = "description" in query.groups
    data: list[Bucket[CostRow]] = []
    for start, end in spans:
        amounts: dict[tuple[str, ...], Decimal] = {}
        for m, t in ledger.minutes.items():
            if not _in(query, m, start, end):
                continue
            for token_type, cents in _cents(m, t).items():
                key = (m.model, m.service_tier, _window(m), token_type) if by_description else ()
                amounts[key] = amounts.get(key, Decimal(0)) + cents
        rows = [_cost_row(key, cents) for key, cents in amounts.items()]
        data.append(Bucket(_rfc3339(start), _rfc3339(end), rows))
    return Report(data, token is not None, token)


def _cents(m: Minute, t: ModelTotals) -> dict[str, Decimal]:
    table = PRICES[m.model]
    prices: Prices = table.long if m.long_context and table.long is not None else table.base
    factor = Decimal(str(BATCH_FACTOR)) if m.service_tier == "batch" else Decimal(1)
    tokens = {
        "uncached_input_tokens": t.input_tokens,
        "cache_creation.ephemeral_5m_input_tokens": t.ephemeral_5m_input_tokens,
        "cache_creation.ephemeral_1h_input_tokens": t.ephemeral_1h_input_tokens,
        "cache_read_input_tokens": t.cache_read_input_tokens,
        "output_tokens": t.output_tokens,
    }
    return {
        kind: n * Decimal(str(getattr(prices, TOKEN_TYPES[kind][0]))) * factor / 10_000
        for kind, n in tokens.items()
        if n
    }  # USD per million tokens x tokens / 1e6 x 100 cents


def _cost_row(key: tuple[str, ...], cents: Decimal) -> CostRow:
    amount = format(cents.quantize(Decimal("1e-12")), "f").rstrip("0").rstrip(".") or "0"
    if not key:
        return CostRow(amount=amount)
    model, tier, window, token_type = key
    batch = " Batch" if tier == "batch" else ""
    description = f"{_display(model)}{batch} Usage - {TOKEN_TYPES[token_type][1]}"
    return CostRow(
        amount=amount, cost_type="tokens", token_type=token_type, description=description,
        model=model, service_tier=tier, context_window=window,
    )  # fmt: skip


def _display(model: str) -> str:
    """claude-haiku-5-5 -> Claude Haiku 5.5"""
    words = model.split("-")
    names = [w.capitalize() for w in words if not w.isdigit()]
    version = ".".join(w for w in words if w.isdigit())
    return " ".join([*names, version]) if version else " ".join(names)
