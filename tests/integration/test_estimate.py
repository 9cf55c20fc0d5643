"""`tokenq estimate` against the simulator: count_tokens counts what the API then bills;
without a reachable API the local estimate stands in, and the output says so."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import anthropic
import pytest

from tests.conftest import ROOT, ConfigFactory
from tests.helpers import sim_call
from worker.cli import main
from worker.embedded import free_port


def tokenq(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`tokenq ARGS` in this process (in a thread: it runs an event loop of its own)."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0), capsys.readouterr().out


def workload(tmp_path: Path, jobs: int) -> Path:
    out = tmp_path / "workload.jsonl"
    script = ROOT / "bench" / "workloads" / "make_workload.py"
    subprocess.run([sys.executable, str(script), "--jobs", str(jobs), "--seed", "7", "--out",
                    str(out)], check=True)  # fmt: skip
    return out


async def test_count_tokens_counts_the_input_the_api_then_bills(
    sim: str, make_config: ConfigFactory, client: anthropic.AsyncAnthropic, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    _, path = make_config()
    trace = workload(tmp_path, 40)
    code, out = await asyncio.to_thread(
        tokenq, capsys, "--config", str(path), "estimate", "--workload", str(trace), "--json"
    )
    assert code == 0, out
    figures = json.loads(out)
    assert figures["requests"] == 40 and figures["source"] == f"count_tokens at {sim}"
    assert sim_call(sim, "ledger")["models"] == {}  # counting is free: nothing billed
    # The same requests, sent naively: the input billed is the input counted.
    for line in trace.read_text().splitlines():
        request = json.loads(line)["request"]
        await client.messages.create(model="claude-opus-5-5", **request)
    billed = sim_call(sim, "ledger")["models"]["claude-opus-5-5"]
    assert billed["input_tokens"] == figures["input_tokens"]
    assert set(figures["per_feature"]) == {"support_faq", "classify_ticket", "summarize_doc",
                                           "code_review", "nightly_enrich"}  # fmt: skip
    levers = figures["routed_all_levers_usd"]
    assert levers < figures["routed_usd"] < figures["per_tier_usd"]["opus"]


async def test_one_request_per_tier_with_the_routed_tier_marked(
    sim: str, make_config: ConfigFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    _, path = make_config()
    hi = [{"role": "user", "content": "Hi"}]
    request = json.dumps({"system": "You are Acme's assistant. " * 100, "messages": hi,
                          "max_tokens": 50})  # fmt: skip
    code, out = await asyncio.to_thread(
        tokenq, capsys, "--config", str(path), "estimate", "--feature", "support_faq", request
    )
    assert code == 0, out
    lines = out.splitlines()
    assert (
        lines[0].startswith("input: ")
        and f"from count_tokens at {sim} on claude-haiku-5-5" in lines[0]
    )
    assert "the prefix prompt caching would cache" in lines[1]
    assert lines[2].startswith("output: 50 tokens; output at max_tokens")
    assert lines[3] == "routed: haiku (features.support_faq.tier); priority normal: real time"
    [haiku] = [line for line in lines if line.startswith("haiku ")]
    assert haiku.endswith("<- routed") and haiku.count("$") == 5


async def test_without_a_reachable_api_the_local_estimate_is_used_and_said(
    make_config: ConfigFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    _, path = make_config(**{"anthropic.base_url": f"http://127.0.0.1:{free_port()}"})
    code, out = await asyncio.to_thread(
        tokenq, capsys, "--config", str(path), "estimate", "--output-tokens", "10",
        '{"messages": [{"role": "user", "content": "Hello there"}]}',
    )  # fmt: skip
    assert code == 0, out
    assert "from the local estimate (4 characters a token; count_tokens at http://127.0.0.1:" in out
    assert "failed: APIConnectionError" in out
    assert "output: 10 tokens; 10 output tokens a request (--output-tokens)" in out
