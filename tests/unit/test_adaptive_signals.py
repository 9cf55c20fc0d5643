"""What the adaptive router tells jobs apart by and prices them at (worker.adaptive): kinds
from the signals a request shows, a call priced as the feature's calls are billed (prompt
cache, output, batches), and answers of a blind check counted only once judged."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tests.unit.test_adaptive import KEYS, T0, MemoryTx, adaptive_config, config_error
from tests.unit.test_adaptive_price import priced_config
from worker import adaptive, checks, learning
from worker.adaptive import Answered, Stats, TierStats, job_cost_usd, judged, record_into
from worker.config import Config
from worker.contract import Job
from worker.feedback import revise, verdict_into
from worker.jobrun import Call, JobRun


def signals(**settings: Any) -> Config:
    return adaptive_config(kinds="signals", **settings)


def kind(text: str, **settings: Any) -> str:
    return adaptive.kind_of(signals(**settings).router.adaptive, 0, text)


def test_signal_kinds_are_doublings_of_the_messages_length() -> None:
    # 4 characters a token: 100 characters are 25 tokens, in 16-32.
    assert [kind("x" * n) for n in (0, 4, 100, 128, 4096, 8192 + 4)] == [
        "1-2", "1-2", "16-32", "32-64", "1k-2k", "2k-4k",
    ]  # fmt: skip


def test_hard_words_and_code_blocks_move_a_job_up_at_most_three_steps() -> None:
    words = {"hard_words": ["Why", "race condition"]}
    assert kind("x" * 100, **words) == "16-32"
    assert kind("why is this" + "x" * 89, **words) == "16-32+1"
    assert kind("WHY a RACE CONDITION?" + "x" * 79, **words) == "16-32+2"
    fenced = "```a``` ```b``` why race condition" + "x" * 60
    assert kind(fenced, **words) == "16-32+3"  # 4 steps found, 3 counted
    assert kind("```code```" + "x" * 90) == "16-32+1"  # code blocks count without words


async def test_the_route_counts_signal_kinds_from_the_messages_alone() -> None:
    cfg = signals()
    params = {"system": "s" * 40_000, "messages": [{"role": "user", "content": "x" * 100}]}

    async def counts() -> Stats:
        return Stats()

    job = Job(feature="summarize", request="{}")
    routed = await learning.route(cfg, job, cfg.features["summarize"], params, "j", counts)
    assert routed.kind == "16-32"  # the 10,000 tokens of system prompt left out
    assert routed.decided is not None and "summarize/16-32" in routed.decided[1]


def test_a_call_is_priced_as_the_features_calls_are_billed() -> None:
    cfg = priced_config()
    price = {t: cfg.models[m] for t, m in cfg.tiers.items()}
    # The feature's calls read 900 tokens from the prompt cache and write 40 on average.
    stats = Stats(calls=10, cache_read_tokens=9000, output_tokens=400)
    cost = job_cost_usd(cfg, 1000, stats)
    for tier, p in price.items():
        usd = 100 * p.input_usd_per_mtok + 900 * p.cache_read_usd_per_mtok
        assert cost[tier] == pytest.approx((usd + 40 * p.output_usd_per_mtok) / 1e6)
    batched = job_cost_usd(cfg, 1000, stats, batched=True)
    assert batched == {t: pytest.approx(c * (1 - price[t].batch_discount)) for t, c in cost.items()}
    # A shorter job than the average cached prefix: all of it at the cache-read price.
    assert job_cost_usd(cfg, 500, stats)["opus"] == pytest.approx(
        (500 * price["opus"].cache_read_usd_per_mtok + 40 * price["opus"].output_usd_per_mtok) / 1e6
    )
    assert job_cost_usd(cfg, 1000) == job_cost_usd(cfg, 1000, Stats())  # nothing known yet


def test_the_usage_counted_is_read_back_as_an_average_per_call() -> None:
    cfg = priced_config()
    tx = MemoryTx()
    a = cfg.router.adaptive
    adaptive.usage_into(tx, KEYS, a, "summarize", [(1200, 30), (0, 50)], T0)
    adaptive.usage_into(tx, KEYS, a, "summarize", [(1200, 40)], T0)
    stats = tx.stats(cfg, "summarize", T0)
    assert stats.calls == pytest.approx(3)
    assert stats.per_call() == pytest.approx((800, 40))
    assert stats.counts == {}  # usage is not a tier's count


def blind_answer(tx: MemoryTx, cfg: Config, job_id: str, tier: str = "haiku") -> Answered:
    record_into(tx, KEYS, cfg, feature="summarize", kind="short", job_id=job_id,
                answers=[(tier, None)], now_ms=T0, blind=True)  # fmt: skip
    return msgspec.json.decode(tx.strings[KEYS.answered(job_id)], type=Answered)


def test_a_blind_checks_passes_count_only_until_a_verdict_judges_one() -> None:
    cfg = adaptive_config()
    assert adaptive.blind(cfg.features["summarize"])
    assert not adaptive.blind(cfg.features["classify_ticket"])  # expect = "json"
    tx = MemoryTx()
    records = [blind_answer(tx, cfg, f"j{n}") for n in range(10)]
    stats = tx.stats(cfg, "summarize", T0)
    assert stats.counts["short", "haiku"] == TierStats(unjudged=10, recent_unjudged=10)
    # Nobody reports on the feature: the unjudged answers are all there is, as passes.
    assert judged(stats).counts["short", "haiku"].passed == pytest.approx(10)
    # One verdict of two: only the judged answers count, the wrong one no longer hidden.
    for record, revised in ((records[0], revise(records[0], "bad", "", T0)),
                            (records[1], revise(records[1], "good", "", T0))):  # fmt: skip
        verdict_into(tx, KEYS, cfg.router.adaptive, record, revised, T0)
    counted = judged(tx.stats(cfg, "summarize", T0)).counts["short", "haiku"]
    assert counted.passed == pytest.approx(1)
    assert counted.failed == pytest.approx(1)


def test_hard_words_must_be_words() -> None:
    assert "router.adaptive.hard_words" in config_error({"router/adaptive/hard_words": [""]})
    assert "router.adaptive.kinds" in config_error({"router/adaptive/kinds": "length"})


def test_a_priced_jobs_end_teaches_its_calls_usage_and_counts_a_blind_pass_unjudged() -> None:
    cfg = priced_config()  # summarize: plain text, priced
    calls = [
        Call(model="m", tier="haiku", started_ms=T0, state="answered", cache_read=900,
             output_tokens=20, check=checks.CUT),
        Call(model="m", tier="sonnet", started_ms=T0, state="answered", cache_read=0,
             output_tokens=60),
    ]  # fmt: skip
    run = JobRun(first_ms=T0, calls=calls, kind="16-32")
    tx = MemoryTx()
    learning.learn_into(tx, KEYS, cfg, feature="summarize", job_id="j", run=run, now_ms=T0)
    stats = tx.stats(cfg, "summarize", T0)
    assert stats.per_call() == pytest.approx((450, 40))
    assert stats.counts == {("16-32", "sonnet"): TierStats(unjudged=1, recent_unjudged=1)}
    # A feature with a target pass rate does not read usage: none is written for it.
    tx = MemoryTx()
    learning.learn_into(tx, KEYS, adaptive_config(), feature="summarize", job_id="j", run=run,
                        now_ms=T0)  # fmt: skip
    assert tx.stats(cfg, "summarize", T0).calls == 0
