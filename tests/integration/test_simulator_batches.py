"""Message Batches through the official SDK: create, retrieve, list, cancel, delete and
results (`async for`), on a batch clock moved with POST /_sim/advance; the ledger's batch
section at half price.

The simulator is a process of this module's own, with batches taking 60 s of its clock.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse
from anthropic.types.messages.batch_create_params import Request

from tests.helpers import own_simulator, settings_restored, sim_call

HAIKU = "claude-haiku-5-5"
BATCH_S = 60
DEFAULTS: dict[str, Any] = {"batch_seconds": BATCH_S, "batch_error_rate": 0.0,
                            "batch_expiry_rate": 0.0, "fault_rate": {}}  # fmt: skip


@pytest.fixture(scope="module")
def simulator_url() -> Iterator[str]:
    """The simulator in its own process, batches taking BATCH_S seconds; its base URL."""
    with own_simulator("--batch-seconds", str(BATCH_S)) as url:
        yield url


@pytest.fixture(autouse=True)
def clean(simulator_url: str) -> Iterator[None]:
    with settings_restored(simulator_url, DEFAULTS):
        yield


def requests(n: int, **extra: Any) -> list[Request]:
    """n requests for Haiku 5.5, custom_id job-0 ... job-(n-1), with `extra` params."""
    made: list[Request] = []
    for i in range(n):
        ask = [{"role": "user", "content": f"Summarise ticket {i}."}]
        params: Any = {"model": HAIKU, "max_tokens": 60, **extra, "messages": ask}
        made.append({"custom_id": f"job-{i}", "params": params})
    return made


def advance(url: str, seconds: float) -> None:
    sim_call(url, "advance", {"seconds": seconds})


async def collect(
    client: anthropic.AsyncAnthropic, batch_id: str
) -> dict[str, MessageBatchIndividualResponse]:
    return {line.custom_id: line async for line in await client.messages.batches.results(batch_id)}


async def test_a_batch_moves_with_the_clock_and_its_results_parse(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    batch = await client.messages.batches.create(requests=requests(5))
    assert batch.id.startswith("msgbatch_") and batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 5 and batch.results_url is None
    assert (batch.expires_at - batch.created_at).total_seconds() == 24 * 3600
    advance(simulator_url, BATCH_S / 2)
    half = await client.messages.batches.retrieve(batch.id)
    assert half.processing_status == "in_progress" and half.request_counts.processing == 5
    with pytest.raises(anthropic.AnthropicError, match="Has it finished processing"):
        await client.messages.batches.results(batch.id)
    advance(simulator_url, BATCH_S / 2)
    ended = await client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.ended_at is not None
    assert ended.request_counts.succeeded == 5 and ended.request_counts.processing == 0
    assert ended.results_url == f"{simulator_url}/v1/messages/batches/{batch.id}/results"
    lines = await collect(client, batch.id)
    assert set(lines) == {f"job-{i}" for i in range(5)}
    for line in lines.values():
        assert line.result.type == "succeeded"
        message = line.result.message
        assert message.content and message.usage.service_tier == "batch"


async def test_batch_items_cost_half_of_the_same_requests_realtime(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    for request in requests(4):
        await client.messages.create(**request["params"])
    batch = await client.messages.batches.create(requests=requests(4))
    advance(simulator_url, BATCH_S)
    assert (await client.messages.batches.retrieve(batch.id)).processing_status == "ended"
    ledger = sim_call(simulator_url, "ledger")
    realtime, batched = ledger["models"][HAIKU], ledger["batch"][HAIKU]
    assert batched["requests"] == realtime["requests"] == 4
    assert batched["input_tokens"] == realtime["input_tokens"]
    assert batched["output_tokens"] == realtime["output_tokens"]
    assert batched["cost_usd"] == pytest.approx(realtime["cost_usd"] / 2, rel=1e-9)
    total = realtime["cost_usd"] + batched["cost_usd"]
    assert ledger["total_cost_usd"] == pytest.approx(total, rel=1e-9)


async def test_error_and_expiry_rates_give_those_results(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"batch_error_rate": 0.3, "batch_expiry_rate": 0.2})
    batch = await client.messages.batches.create(requests=requests(100))
    advance(simulator_url, BATCH_S)
    counts = (await client.messages.batches.retrieve(batch.id)).request_counts
    lines = await collect(client, batch.id)
    types = [line.result.type for line in lines.values()]
    assert types.count("errored") == counts.errored > 10
    assert types.count("expired") == counts.expired > 5
    assert types.count("succeeded") == counts.succeeded == 100 - counts.errored - counts.expired
    errored = next(line.result for line in lines.values() if line.result.type == "errored")
    assert errored.type == "errored" and errored.error.error.type == "api_error"
    assert sim_call(simulator_url, "ledger")["batch"][HAIKU]["requests"] == counts.succeeded


async def test_invalid_params_come_back_as_errored_results(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    batch = await client.messages.batches.create(requests=requests(2, max_tokens=0))
    advance(simulator_url, BATCH_S)
    for line in (await collect(client, batch.id)).values():
        assert line.result.type == "errored"
        assert line.result.error.error.type == "invalid_request_error"


async def test_a_bad_custom_id_is_a_bad_request(client: anthropic.AsyncAnthropic) -> None:
    bad = requests(1)
    bad[0]["custom_id"] = "job 1"
    with pytest.raises(anthropic.BadRequestError, match="custom_id: String should match"):
        await client.messages.batches.create(requests=bad)


async def test_cancel_moves_through_canceling_to_ended(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    batch = await client.messages.batches.create(requests=requests(10))
    advance(simulator_url, BATCH_S * 0.25)  # items 0 and 1 done, 2 in flight
    canceling = await client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    advance(simulator_url, BATCH_S * 0.05)
    ended = await client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert (ended.request_counts.succeeded, ended.request_counts.canceled) == (3, 7)
    types = {cid: line.result.type for cid, line in (await collect(client, batch.id)).items()}
    assert types["job-2"] == "succeeded" and types["job-9"] == "canceled"


async def test_list_is_newest_first_and_pages(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    made: list[MessageBatch] = []
    for _ in range(5):
        made.append(await client.messages.batches.create(requests=requests(1)))
        advance(simulator_url, 1)
    first = await client.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == [made[4].id, made[3].id] and first.has_more
    every = [b.id async for b in client.messages.batches.list(limit=2)]  # follows after_id
    assert every == [b.id for b in reversed(made)]


async def test_delete_only_once_ended(client: anthropic.AsyncAnthropic, simulator_url: str) -> None:
    batch = await client.messages.batches.create(requests=requests(1))
    with pytest.raises(anthropic.BadRequestError, match="cancel it"):
        await client.messages.batches.delete(batch.id)
    advance(simulator_url, BATCH_S)
    deleted = await client.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.retrieve(batch.id)


async def test_batch_settings_show_once_changed_and_bad_rates_are_refused(
    simulator_url: str,
) -> None:
    shown = sim_call(simulator_url, "config", {"batch_error_rate": 0.1})
    assert shown["batch_seconds"] == BATCH_S and shown["batch_error_rate"] == 0.1
    with pytest.raises(urllib.error.HTTPError) as refused:
        sim_call(simulator_url, "config", {"batch_error_rate": 0.6, "batch_expiry_rate": 0.6})
    assert "more than 1" in refused.value.read().decode()
    assert sim_call(simulator_url, "config")["batch_error_rate"] == 0.1
