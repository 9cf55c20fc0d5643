"""`python -m simulator` (also `tokenq simulator`): a local Anthropic API with a billing ledger."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web

from simulator import faults
from simulator.app import Settings, make_app

SHUTDOWN_S = 1.0
DESCRIPTION = """\
A local HTTP server that answers the Anthropic Messages API (POST /v1/messages and
/v1/messages/count_tokens) with deterministic replies and token counts, and keeps a ledger
of what it billed. Point the SDK at it: AsyncAnthropic(base_url=URL, api_key="anything").
Once listening it prints one line: `simulator listening on http://HOST:PORT`.
"""
EPILOG = """\
admin routes (not part of the Anthropic API):
  GET  /_sim/ledger   {"models": {MODEL: {requests, input_tokens, output_tokens,
                       cache_creation_input_tokens, cache_read_input_tokens, cost_usd}},
                       "faults": {"429": N, ...}, "rejected": N, "total_cost_usd": X,
                       "in_flight": N}
  POST /_sim/reset    clear the ledger; answers the ledger as it was
  POST /_sim/config   {"latency_ms": 200, "fault_rate": {"529": 0.1}, "seed": 1}, any subset;
                      answers the settings now in effect (GET shows them)
  GET  /_sim/health   {"ok": true}

example: python -m simulator --port 0 --latency-ms 300 --fault-rate 429=0.1,529=0.05
"""


def parse_fault_rates(text: str) -> dict[str, float]:
    """--fault-rate's type: `429=0.1,529=0.05` into {"429": 0.1, "529": 0.05}."""
    try:
        return faults.parse_fault_rates(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return value


def _port(text: str) -> int:
    value = _non_negative(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0-65535; 0 picks a free one)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8787, help="0 picks a free port (8787)")
    parser.add_argument(
        "--latency-ms", type=_non_negative, default=0, metavar="MS",
        help="non-blocking delay before each /v1/messages answer, faults included (0)",
    )  # fmt: skip
    parser.add_argument(
        "--fault-rate", type=parse_fault_rates, default={}, metavar="STATUS=RATE,...",
        help="share of valid /v1/messages requests answered with an error instead, per status "
        "(429, 500, 504, 529; rates 0..1 summing to at most 1), e.g. 429=0.1,529=0.05,500=0.01",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault dice (0)")
    return parser


async def serve(host: str, port: int, settings: Settings) -> None:
    """Listen on host:port, print the URL line, and serve until SIGINT or SIGTERM."""
    # A stop waits at most SHUTDOWN_S for answers still sleeping out their latency.
    runner = web.AppRunner(
        make_app(settings), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_S
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=4096).start()
    except OSError as exc:
        await runner.cleanup()
        sys.exit(
            f"simulator: cannot listen on {host}:{port} ({exc.strerror}); "
            "pick another --port, or --port 0 for a free one"
        )
    bound = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    print(f"simulator listening on http://{shown}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve; returns (exit status 0) after SIGINT or SIGTERM."""
    args = build_parser().parse_args(argv)
    settings = Settings(latency_ms=args.latency_ms, fault_rate=args.fault_rate, seed=args.seed)
    asyncio.run(serve(args.host, args.port, settings))


if __name__ == "__main__":
    main()
