"""The Admin API's usage and cost reports, summed per UTC day and model (for reconcile).

`GET /v1/organizations/usage_report/messages` with `group_by[]=model` and daily buckets gives
the tokens; `GET /v1/organizations/cost_report` with `group_by[]=description` the cost per
model and service tier, as decimal strings in cents ("123.45" in "USD" is $1.23). Both want
an Admin API key (`sk-ant-admin...`) as `x-api-key`, with `anthropic-version: 2023-06-01`;
buckets snap to UTC days, `limit` is at most 31 daily buckets a page, and `has_more` with
`next_page` page on. Docs: platform.claude.com/docs/en/api/admin/usage_report/
retrieve_messages, platform.claude.com/docs/en/api/admin/cost_report, and the usage and cost
guide, platform.claude.com/docs/en/build-with-claude/usage-cost-api (the cost report leaves
out Priority Tier costs). The simulator answers both from its ledger (simulator/admin.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec

MAX_PAGES = 1000  # a report that keeps saying has_more is cut off here
ADMIN_VERSION = "2023-06-01"


class ProviderError(Exception):
    """The Admin API could not be reached or refused a request (the message says which)."""


@dataclass
class Side:
    """One side's sums for a (day, model)."""

    input_tokens: int = 0  # uncached input
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    batch_cost_usd: Decimal = Decimal(0)

    def tokens(self) -> tuple[int, int, int, int]:
        return (
            self.input_tokens,
            self.cache_write_tokens,
            self.cache_read_tokens,
            self.output_tokens,
        )


Key = tuple[str, str]  # (day YYYY-MM-DD, model)


# The reports' shapes, as far as reconcile reads them (other fields are ignored).
class _CacheCreation(msgspec.Struct):
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class _UsageRow(msgspec.Struct):
    model: str | None = None
    uncached_input_tokens: int = 0
    cache_creation: _CacheCreation | None = None
    cache_read_input_tokens: int = 0
    output_tokens: int = 0


class _CostRow(msgspec.Struct):
    amount: str = "0"
    currency: str = "USD"
    model: str | None = None
    service_tier: str | None = None
    workspace_id: str | None = None


class _UsageBucket(msgspec.Struct):
    starting_at: str
    results: list[_UsageRow] = []


class _CostBucket(msgspec.Struct):
    starting_at: str
    results: list[_CostRow] = []


class _UsagePage(msgspec.Struct):
    data: list[_UsageBucket] = []
    has_more: bool = False
    next_page: str | None = None


class _CostPage(msgspec.Struct):
    data: list[_CostBucket] = []
    has_more: bool = False
    next_page: str | None = None


class AdminApi:
    """The two reports of the Admin API at base_url (the API, or the simulator)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, key: str) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.headers = {"x-api-key": key, "anthropic-version": ADMIN_VERSION}

    async def _get(self, path: str, params: list[tuple[str, str]]) -> bytes:
        url = f"{self.base_url}{path}"
        try:
            async with self.session.get(url, params=params, headers=self.headers) as reply:
                body = await reply.read()
                if reply.status == 401 or reply.status == 403:
                    raise ProviderError(
                        f"the Admin API at {self.base_url} refused the key ({reply.status}): set "
                        "ANTHROPIC_ADMIN_API_KEY to an Admin API key (sk-ant-admin..., made in "
                        "the Console under Settings, Admin keys)"
                    )
                if reply.status != 200:
                    text = body.decode(errors="replace")[:300]
                    raise ProviderError(f"GET {url} answered {reply.status}: {text}")
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(f"cannot reach the Admin API at {self.base_url}: {exc}") from None

    async def _pages(self, path: str, params: list[tuple[str, str]]) -> AsyncIterator[bytes]:
        page = None
        for _ in range(MAX_PAGES):
            body = await self._get(path, [*params, *([("page", page)] if page else [])])
            yield body
            head = _decode(body, _PageHead)
            if not head.has_more or not head.next_page or head.next_page == page:
                return
            page = head.next_page
        raise ProviderError(f"GET {self.base_url}{path}: more than {MAX_PAGES} pages")

    async def totals(
        self, first_day: dt.date, last_day: dt.date, workspace: str | None
    ) -> dict[Key, Side]:
        """The provider's sums per (day, model) from the first day to the last (inclusive)."""
        span = [
            ("starting_at", f"{first_day.isoformat()}T00:00:00Z"),
            ("ending_at", f"{(last_day + dt.timedelta(days=1)).isoformat()}T00:00:00Z"),
            ("bucket_width", "1d"),
            ("limit", "31"),
        ]
        out: dict[Key, Side] = {}
        usage = [
            *span,
            ("group_by[]", "model"),
            *([("workspace_ids[]", workspace)] if workspace else []),
        ]
        async for body in self._pages("/v1/organizations/usage_report/messages", usage):
            for bucket in _decode(body, _UsagePage).data:
                for row in bucket.results:
                    side = out.setdefault(
                        (bucket.starting_at[:10], row.model or "(no model)"), Side()
                    )
                    side.input_tokens += row.uncached_input_tokens
                    cc = row.cache_creation or _CacheCreation()
                    side.cache_write_tokens += (
                        cc.ephemeral_5m_input_tokens + cc.ephemeral_1h_input_tokens
                    )
                    side.cache_read_tokens += row.cache_read_input_tokens
                    side.output_tokens += row.output_tokens
        cost = [*span, ("group_by[]", "description"), ("group_by[]", "workspace_id")]
        async for body in self._pages("/v1/organizations/cost_report", cost):
            for bucket in _decode(body, _CostPage).data:
                for row in bucket.results:
                    if workspace and row.workspace_id != workspace:
                        continue
                    usd = _cents(row.amount) / 100
                    side = out.setdefault(
                        (bucket.starting_at[:10], row.model or "(not tokens)"), Side()
                    )
                    side.cost_usd += usd
                    if row.service_tier == "batch":
                        side.batch_cost_usd += usd
        return out


class _PageHead(msgspec.Struct):
    has_more: bool = False
    next_page: str | None = None


def _decode(body: bytes, type_: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise ProviderError(f"the Admin API's answer is not a report: {exc}") from None


def _cents(amount: str) -> Decimal:
    try:
        return Decimal(amount)
    except ArithmeticError:
        raise ProviderError(
            f"the cost report has an amount {amount!r} that is not a number"
        ) from None
