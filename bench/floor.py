"""The floor the `anthropic` SDK sets under a worker: memory at import, and CPU per call.

    python3 dev.py bench floor [--calls 3000] [--rounds 7] [--concurrency 64]

1. Peak memory (VmHWM) of fresh interpreters that only import: nothing; `redis.asyncio`;
   `anthropic`; `anthropic` and make a client; tokenq's worker (`worker.worker`, what `tokenq
   worker` imports before it does anything).
2. CPU per call (this process's user + system time over `--calls` calls, `--concurrency` at a
   time, median of `--rounds` rounds, interleaved) of a POST /v1/messages answered in-process
   by an httpx2.MockTransport (the transport bench/throughput.py's tokenq-inproc uses), the
   response read:
   - through the SDK as tokenq calls it (worker.calls.post_message on worker.calls.lean_client:
     the SDK's low-level post with a prebuilt body, no per-call tracing span);
   - through the SDK's own HTTP client (httpx2) alone, no SDK: what the SDK adds is the
     difference.
It proves what no job path can go below while it calls the API through the SDK; it does not
measure tokenq's own job path (bench/throughput.py does). Prints the SDK's CPU per call last.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
from common import ROOT, say

sys.path.insert(0, str(ROOT / "bench" / "contenders"))
from tokenq_run import InProcessApi

from worker.calls import lean_client, post_message

IMPORTS = {
    "python, nothing imported": "pass",
    "import redis.asyncio": "import redis.asyncio",
    "import anthropic": "import anthropic",
    "import anthropic, make a client": "import anthropic; anthropic.AsyncAnthropic(api_key='x')",
    "import worker.worker (tokenq worker)": "import worker.worker",
}
PARAMS: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "Summarise: queues keep bills small."}],
}


def peak_mib(code: str) -> tuple[float, int]:
    """(VmHWM in MiB, modules loaded) of a fresh interpreter that runs `code`."""
    probe = (f"{code}\nimport sys\nfor line in open('/proc/self/status'):\n"
             "    if line.startswith('VmHWM:'):\n"
             "        print(int(line.split()[1]) / 1024, len(sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    return float(out[0]), int(out[1])


async def per_call(call: Callable[[], Awaitable[None]], calls: int, concurrency: int) -> float:
    """CPU us per call of `calls` calls, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await call()

    started = time.process_time()
    await asyncio.gather(*(one() for _ in range(calls)))
    return (time.process_time() - started) / calls * 1e6


async def cpu(a: argparse.Namespace) -> dict[str, list[float]]:
    api = InProcessApi()
    sdk = lean_client(api.client())
    bare = httpx2.AsyncClient(transport=httpx2.MockTransport(api.answer))
    headers = {"x-api-key": "bench", "anthropic-version": "2023-06-01",
               "content-type": "application/json"}  # fmt: skip

    async def through_sdk() -> None:
        (await post_message(sdk, PARAMS)).read()

    async def httpx_alone() -> None:
        reply = await bare.post("http://bench.invalid/v1/messages", content=b"{}", headers=headers)
        reply.read()

    found: dict[str, list[float]] = {"SDK as tokenq calls it": [], "httpx2 alone": []}
    for n in range(a.rounds):
        say(f"round {n + 1} of {a.rounds}")
        cases = [("SDK as tokenq calls it", through_sdk), ("httpx2 alone", httpx_alone)]
        for name, call in cases if n % 2 == 0 else cases[::-1]:
            found[name].append(await per_call(call, a.calls, a.concurrency))
    await bare.aclose()
    await sdk.close()
    return found


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--calls", type=int, default=3000, help="calls a round (default 3000)")
    p.add_argument("--rounds", type=int, default=7, help="rounds, medians taken (default 7)")
    p.add_argument("--concurrency", type=int, default=64, help="calls at a time (default 64)")
    a = p.parse_args(argv)
    load = loadavg()
    say("peak memory of fresh interpreters")
    memory = {name: peak_mib(code) for name, code in IMPORTS.items()}
    found = asyncio.run(cpu(a))
    print(f"\nload average {load} before, {loadavg()} after")
    print("\npeak RSS (VmHWM) of a fresh interpreter that only imports:")
    for name, (mib, modules) in memory.items():
        print(f"  {name:<40} {mib:6.1f} MiB  {modules:5,} modules")
    print(f"\nCPU per POST /v1/messages answered in-process, {a.calls:,} calls "
          f"{a.concurrency} at a time, median of {a.rounds} rounds (all rounds):")  # fmt: skip
    for name, values in found.items():
        rounds = ", ".join(f"{v:.0f}" for v in values)
        print(f"  {name:<24} {statistics.median(values):5.0f} us  ({rounds})")
    sdk, bare = (statistics.median(v) for v in found.values())
    print(
        f"\nthe SDK's CPU per call as tokenq calls it: {sdk:.0f} us "
        f"({sdk - bare:.0f} us more than httpx2 alone)"
    )


if __name__ == "__main__":
    main()
