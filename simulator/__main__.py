"""`python -m simulator` (also `tokenq simulator`): a local Anthropic API with a billing ledger."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web

from simulator.app import Settings, check_fault_rates, make_app


def parse_fault_rates(text: str) -> dict[str, float]:
    """`429=0.1,529=0.05` into {"429": 0.1, "529": 0.05}; argparse shows the ValueError."""
    rates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        status, sep, rate = part.partition("=")
        try:
            rates[status.strip()] = float(rate)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not STATUS=RATE; write e.g. 429=0.1,529=0.05,500=0.01"
            )
    try:
        return check_fault_rates(rates)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenq simulator",
        description="A local HTTP server that answers the Anthropic Messages API "
        "(POST /v1/messages, /v1/messages/count_tokens) with deterministic replies and token "
        "counts, and keeps a ledger of what it billed: GET /_sim/ledger, POST /_sim/reset, "
        'POST /_sim/config {"latency_ms": 200, "fault_rate": {"529": 0.1}}.',
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8787, help="port; 0 picks a free one (8787)")
    parser.add_argument("--latency-ms", type=int, default=0, help="delay before each answer (0)")
    parser.add_argument(
        "--fault-rate",
        type=parse_fault_rates,
        default={},
        help="share of requests answered with an error instead, per status: "
        "429=0.1,529=0.05,500=0.01 (504 too)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault dice (0)")
    return parser


async def serve(host: str, port: int, settings: Settings) -> None:
    runner = web.AppRunner(make_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"simulator listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.latency_ms < 0:
        build_parser().error("--latency-ms must be 0 or more")
    settings = Settings(latency_ms=args.latency_ms, fault_rate=args.fault_rate, seed=args.seed)
    asyncio.run(serve(args.host, args.port, settings))
    sys.exit(0)


if __name__ == "__main__":
    main()
