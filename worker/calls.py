"""One API call of a job, inside the fleet's limits: its rate-limit capacity, its budget
reservation (worst case) and the circuit breakers, the call, then everything settled to the
usage the API reported; and the feature's policies when a budget refuses or a breaker is open.

`CallPath` is a part of `Worker` (worker.worker), kept apart so that the loop that reads,
runs and finishes jobs reads on its own.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import anthropic
import msgspec
from redis.exceptions import RedisError

from worker import clock
from worker.breakers import Breakers, Open, Ticket
from worker.budgets import Budgets, Hold, Refusal, caps_for, worst_case_usd
from worker.caching import has_cache_control
from worker.config import Config, FeatureConfig
from worker.contract import Job, UsageEvent, to_fields
from worker.errors import BudgetExceeded, CircuitOpen, DeadlineExceeded, TooLarge
from worker.estimate import Calibration
from worker.jobs import (
    ApiMessage,
    Defer,
    Refused,
    Spend,
    check_deadline,
    decode_message,
    failure_answer,
)
from worker.limiter import Answer, Grant, Limiter, Unfit
from worker.queue import Queue
from worker.router import cheaper
from worker.usage import ApiUsage, cost_usd

log = logging.getLogger("tokenq.worker")


def _fields(fields: dict[str, str]) -> dict[Any, Any]:
    """redis-py's stubs want invariant dicts of unions; a dict of str is one at runtime."""
    return fields


class CallPath:
    """The calls of a Worker: see the module docstring."""

    cfg: Config
    client: anthropic.AsyncAnthropic
    queue: Queue
    limiter: Limiter
    calibration: Calibration
    budgets: Budgets
    breakers: Breakers

    async def _paid_call(
        self, job: Job, params: dict[str, Any], rank: int, attempt: int, spend: Spend,
        ticket: Ticket | None,
    ) -> tuple[ApiMessage, ApiUsage, int]:  # fmt: skip
        """One API call within the rate limits and the budgets: capacity, then a budget
        reservation of its worst case, the call, then both settled and the breakers told.
        The answer, its usage and the call's latency (ms). Raises Refused when a budget cap
        refuses the reservation."""
        model = params["model"]
        estimate, raw = self.calibration.estimate(model, params)
        grant = await self._capacity(job, model, rank, (1, estimate, int(params["max_tokens"])),
                                     max(attempt, 1))  # fmt: skip
        hold = None
        try:
            # The larger estimate: a factor learnt from other requests may be below 1.
            hold = await self._reserve(job, params, max(estimate, raw))
        except BaseException:
            if grant is not None:
                await asyncio.shield(self._settle(grant, Answer(None, {}, 0)))
            raise
        t0 = clock.monotonic()
        try:
            message, usage = await self._call(params, grant, raw)
        except BaseException as exc:
            if ticket is not None:
                await asyncio.shield(self._record(ticket, exc))
            if hold is not None:
                await asyncio.shield(self._settle_budget(job, hold, 0.0, called=False))
            raise
        latency_ms = int((clock.monotonic() - t0) * 1000)
        cost = cost_usd(usage, self.cfg.models[model])
        spend.add(usage, cost)
        if ticket is not None:
            await self._record(ticket, None)
        if hold is not None:
            await self._settle_budget(job, hold, cost, called=True)
        return message, usage, latency_ms

    async def _reserve(self, job: Job, params: dict[str, Any], estimate: int) -> Hold | None:
        feature = self.cfg.features[job.feature]
        caps = caps_for(self.cfg, self.queue.keys, job.feature, feature, job.tenant or "",
                        clock.utc())  # fmt: skip
        if not caps:
            return None
        model = params["model"]
        worst = worst_case_usd(
            self.cfg.models[model], estimate, int(params["max_tokens"]),
            caches=has_cache_control(params), margin=self.cfg.budgets.estimate_margin,
        )  # fmt: skip
        got = await self.budgets.reserve(caps, uuid.uuid4().hex, worst, clock.now_ms())
        if isinstance(got, Refusal):
            raise Refused(got)
        return got

    async def _settle_budget(self, job: Job, hold: Hold, cost: float, *, called: bool) -> None:
        """Settle a budget reservation; write an alert for each cap that just reached
        budgets.alert_at. A Redis error leaves the hold to expire (see worker.budgets)."""
        try:
            alerts = await self.budgets.settle(hold, cost, called=called)
            for cap in alerts:
                share = self.cfg.budgets.alert_at
                text = (f"{cap.name} reached {share:.0%} of {cap.usd} USD in {cap.period} "
                        f"({self.cfg.budgets.timezone})")  # fmt: skip
                log.warning("budget alert: %s", text)
                event = UsageEvent(
                    ts_ms=clock.now_ms(), job_id="", feature=job.feature, tenant=job.tenant or "",
                    status="ok", kind="alert", message=text, error_type="budget_alert",
                    cost_usd=(cap.usd or 0.0) * share,
                )  # fmt: skip
                usage, maxlen = self.queue.keys.usage, self.cfg.queue.usage_maxlen
                await self.queue.redis.xadd(
                    usage, _fields(to_fields(event)), maxlen=maxlen, approximate=True
                )
        except (RedisError, OSError) as exc:
            log.warning("settling a budget reservation failed: %s", exc)

    async def _record(self, ticket: Ticket, exc: BaseException | None) -> None:
        try:
            await self.breakers.record(ticket, exc)
        except (RedisError, OSError) as err:
            log.warning("updating the circuit breakers failed: %s", err)

    def _on_open(
        self, job: Job, feature: FeatureConfig, tier: str, open_: Open, route: list[str],
        attempt: int,
    ) -> str | Defer:  # fmt: skip
        """An open breaker: the feature's breaker_policy decides (a tier to try, or Defer)."""
        policy = feature.breaker_policy
        down = cheaper(self.cfg, tier)
        if policy == "downgrade" and open_.name.startswith("model:") and down is not None:
            route.append(f"downgraded to {down}: breaker {open_.name} open")
            return down
        if policy == "fail":
            raise CircuitOpen(
                f"the circuit breaker {open_.name} is open after repeated API failures, and "
                f'features.{job.feature}.breaker_policy = "fail". It lets calls through '
                f"again after breakers.reset_timeout_s = {self.cfg.breakers.reset_timeout_s}; "
                "replay the job then (tokenq dead replay).",
                attempts=attempt - 1,
            )
        return self._defer(job, open_.retry_at_ms, f"breaker {open_.name} open")

    def _on_budget(
        self, job: Job, feature: FeatureConfig, tier: str, refusal: Refusal, route: list[str],
        attempt: int,
    ) -> str | Defer:  # fmt: skip
        """A refused budget reservation: the feature's budget_policy decides."""
        policy = feature.budget_policy
        down = cheaper(self.cfg, tier)
        if policy == "downgrade" and refusal.dimension == "usd" and down is not None:
            route.append(f"downgraded to {down}: {refusal.cap.name}")
            return down
        if policy == "defer":
            until = int(refusal.cap.resets_at.timestamp() * 1000)
            return self._defer(job, until, f"{refusal.cap.name} reached")
        raise BudgetExceeded(
            f'{refusal.sentence()}. features.{job.feature}.budget_policy = "{policy}"'
            + (" and there is no cheaper tier" if policy == "downgrade" else "")
            + ". Raise the cap or wait for it to reset, then replay (tokenq dead replay).",
            attempts=attempt - 1,
        )

    def _defer(self, job: Job, until_ms: int, why: str) -> Defer:
        if job.deadline_ms is not None and until_ms > job.deadline_ms:
            raise DeadlineExceeded(
                f"{why}: the job would wait until {until_ms}, past its deadline_ms "
                f"{job.deadline_ms}; submit it again with a later deadline",
                attempts=0,
            )
        return Defer(until_ms, why)

    async def _call(
        self, params: dict[str, Any], grant: Grant | None, raw_estimate: int
    ) -> tuple[ApiMessage, ApiUsage]:
        """One API call, its answer and usage; its rate-limit reservation is settled whatever
        happens."""
        try:
            raw = await self.client.messages.with_raw_response.create(**params)
            body = await raw.read()
        except BaseException as exc:
            if grant is not None:  # shielded: a cancelled job still gives capacity back
                await asyncio.shield(self._settle(grant, failure_answer(exc)))
            raise
        message = decode_message(body)
        usage = msgspec.convert(message.usage, ApiUsage)
        self.calibration.learn(params["model"], raw_estimate, usage.prompt_tokens)
        if grant is not None:
            used = (1, usage.input_tokens + usage.cache_write, usage.output_tokens)
            await self._settle(grant, Answer(used, raw.headers))
        return message, usage

    async def _capacity(
        self, job: Job, model: str, rank: int, want: tuple[int, int, int], attempt: int
    ) -> Grant | None:
        """Wait for rate-limit capacity for one call, no longer than the job's deadline."""
        try:
            if job.deadline_ms is None:
                return await self.limiter.acquire(model, job.feature, rank, want)
            async with asyncio.timeout(max(0.0, (job.deadline_ms - clock.now_ms()) / 1000)):
                return await self.limiter.acquire(model, job.feature, rank, want)
        except Unfit as exc:
            raise TooLarge(str(exc), attempts=attempt - 1) from None
        except TimeoutError:
            check_deadline(job)
            raise

    async def _settle(self, grant: Grant, answer: Answer) -> None:
        """Settle a reservation. A Redis error here only costs capacity until the buckets
        refill; it must not fail a call that was made (a retry would call the API again)."""
        try:
            await self.limiter.settle(grant, answer)
        except (RedisError, OSError) as exc:
            log.warning("settling %s's rate-limit reservation failed: %s", grant.model, exc)
