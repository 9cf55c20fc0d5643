"""`python -m simulator` (also `tokenq simulator`): a local Anthropic API with a billing ledger."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web

from simulator import faults, limits, truth
from simulator.app import make_app
from simulator.pricing import PRICES
from simulator.settings import MAX_SKILL, Settings, check_batch_rates, check_skills

SHUTDOWN_S = 1.0
DESCRIPTION = """\
A local HTTP server that answers the Anthropic Messages API (POST /v1/messages and
/v1/messages/count_tokens) with deterministic replies and token counts, and keeps a ledger
of what it billed. Point the SDK at it: AsyncAnthropic(base_url=URL, api_key="anything").
It enforces per-model rate limits as the API does: requests, input tokens and output tokens
per minute, in token buckets that refill continuously; a request that would exceed one is
answered 429 rate_limit_error with `retry-after`. It caches prompts as the API does:
`cache_control` breakpoints on tools, system and message blocks (or top-level, automatic),
at most 4, a per-model minimum length, 5m or 1h lifetimes refreshed by each hit, and usage
split into input, cache writes by TTL and cache reads, billed at their prices. It runs
Message Batches (/v1/messages/batches: create, retrieve, list, cancel, delete, results)
on its own clock: a batch takes --batch-seconds, its items are answered as /v1/messages
would answer them (through the prompt cache, outside the rate limits) and billed at half
price, and seeded shares of items can come back `errored` or `expired`. It injects faults
on seeded shares of requests (429 with or without `retry-after`, the organization's spend cap,
500, 504, 529, 529 on batch create) and slow answers, and can hold the spend cap on.

With --quality on its answers are right or wrong by a synthetic ground truth: each request
has a difficulty (0-10) from its content, of which --signal is explained by what a router
can see (its kind, length, hard words, structure), each model a skill, and an answer is
right with probability 1/(1+exp(-1.5 (skill - difficulty))). A wrong answer to a request for
JSON fails a parse or schema check with probability --json-visible; other wrong answers look
right. tokenq's router classifier prompt gets a tier name, right with probability
--classifier-accuracy. GET or POST /_sim/grade tells a benchmark which answers were right.
With --quality off (the default) every answer is right, exactly as without ground truth.
It answers the Admin API's usage and cost reports (GET
/v1/organizations/usage_report/messages and /v1/organizations/cost_report) from its ledger.

Once listening it prints one line: `simulator listening on http://HOST:PORT`.
"""
EPILOG = """\
admin routes (not part of the Anthropic API):
  GET  /_sim/ledger   {"models": {MODEL: {requests, input_tokens, output_tokens,
                       cache_creation_input_tokens, cache_read_input_tokens, cost_usd,
                       ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}},
                       "faults": {"429": N, ...}, "rate_limited": {"requests": N,
                       "input_tokens": N, "output_tokens": N}, "rejected": N,
                       "total_cost_usd": X (realtime + batch), "in_flight": N,
                       "peak_in_flight": N (the most at once since the last reset),
                       "batch": {MODEL: {the same totals, for batch items at batch prices}}}
  POST /_sim/reset    clear the ledger, the prompt cache and the batches, and refill the
                      rate-limit buckets; answers the ledger as it was
  POST /_sim/advance  {"seconds": 301}: move the simulator's clock forward (prompt-cache
                      lifetimes, batch processing) without waiting; answers
                      {"now": UNIX_S, "advanced_s": N}
  POST /_sim/config   {"latency_ms": 200, "fault_rate": {"529": 0.1}, "seed": 1,
                       "limits": {"*": [600, 200000, 40000], MODEL: [RPM, ITPM, OTPM]},
                       "otpm_mode": "max_tokens", "batch_seconds": 5, "batch_error_rate":
                       0.05, "batch_expiry_rate": 0.01, "spend_cap_reached": true,
                       "slow_rate": 0.05, "slow_ms": 5000, "quality": "on", "signal": 0.5,
                       "skills": {MODEL: SKILL}, "json_visible": 0.6,
                       "classifier_accuracy": 0.8}, any subset; `limits` replaces the whole
                      table (no "*": the standard 1000/2000000/400000) and refills the
                      buckets; `skills` replaces the changed skills (models it does not
                      name get their default); answers the settings now in effect (GET
                      shows them)
  POST /_sim/grade    {"items": [{"request": {...}, "model": MODEL}, ...], "ids": [MSG_ID]}:
                      the truth of each item (the request as the job sent it) by the
                      settings of the moment: {"kind", "difficulty", "p_correct",
                      "correct"} in order; and of each answered message id, as recorded
                      (the last 100,000 answers with quality on): {"model", "kind", ...}
  GET  /_sim/grade?ids=msg_a,msg_b   the recorded truth of those answers
  GET  /_sim/health   {"ok": true}

examples:
  python -m simulator --port 0 --latency-ms 300 --fault-rate 429=0.1,529=0.05
  python -m simulator --limit 600/200000/40000 --limit claude-haiku-5-5=100/50000/10000
  python -m simulator --batch-seconds 30 --batch-error-rate 0.02 --batch-expiry-rate 0.01
  python -m simulator --fault-rate 429-bare=0.05,spend-cap=0.001,batch-529=0.2
  python -m simulator --slow-rate 0.05 --slow-ms 5000 --spend-cap-reached
  python -m simulator --quality on --signal 0.7 --skill claude-haiku-5-5=3.5
"""


def parse_fault_rates(text: str) -> dict[str, float]:
    """--fault-rate's type: `429=0.1,529=0.05` into {"429": 0.1, "529": 0.05}."""
    try:
        return faults.parse_fault_rates(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_limit(text: str) -> tuple[str, limits.Triple]:
    """--limit's type: `600/200000/40000` (every model) or `MODEL=RPM/ITPM/OTPM` (one)."""
    try:
        return limits.parse_limit(text)
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
        "--fault-rate", type=parse_fault_rates, default={}, metavar="FAULT=RATE,...",
        help="share of valid /v1/messages requests answered with an error instead, per fault "
        "(rates 0..1 summing to at most 1): 429 (with retry-after: 1), 429-bare (no "
        "retry-after), spend-cap (429 enforced_spend_limit_reached, no retry-after), 500, 504, "
        "529; and batch-529: share of valid batch creates answered 529 (the batch is not "
        "created); e.g. 429=0.1,529=0.05,500=0.01",
    )  # fmt: skip
    parser.add_argument(
        "--spend-cap-reached", action="store_true",
        help="start with the organization's monthly spend cap reached: every /v1/messages "
        "request and batch create gets 429 enforced_spend_limit_reached until POST "
        '/_sim/config {"spend_cap_reached": false}',
    )  # fmt: skip
    parser.add_argument(
        "--slow-rate", type=_rate, default=0.0, metavar="RATE",
        help="share of /v1/messages requests answered --slow-ms later than the rest, faults "
        "included, seeded by --seed (0)",
    )  # fmt: skip
    parser.add_argument(
        "--slow-ms", type=_non_negative, default=5000, metavar="MS",
        help="how much later a slow answer comes (5000)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the fault, slow and batch dice and of the ground truth's draws (0)",
    )  # fmt: skip
    parser.add_argument(
        "--limit", type=parse_limit, action="append", default=[], metavar="[MODEL=]RPM/ITPM/OTPM",
        help="rate limits per minute: requests, input tokens (input + cache writes), output "
        "tokens; without MODEL= for every model not given its own; repeatable "
        "(1000/2000000/400000, the standard table)",
    )  # fmt: skip
    parser.add_argument(
        "--otpm-mode", choices=("actual", "max_tokens"), default="actual",
        help="output-token accounting: 'actual' counts output as generated (2026 docs); "
        "'max_tokens' reserves max_tokens at the start and refunds the rest (2025 docs) (actual)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-seconds", type=_seconds, default=1.0, metavar="S",
        help="how long a Message Batch takes to process on the simulator's clock: its items "
        "finish evenly over S seconds, then it ends (1; POST /_sim/advance skips ahead)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-error-rate", type=_rate, default=0.0, metavar="RATE",
        help="share of batch items answered `errored` (api_error), seeded by --seed (0)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-expiry-rate", type=_rate, default=0.0, metavar="RATE",
        help="share of batch items left `expired`, seeded by --seed (0)",
    )  # fmt: skip
    _add_quality(parser)
    return parser


def _add_quality(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ground truth (synthetic; README: The simulator)")
    group.add_argument(
        "--quality", choices=("off", "on"), default="off",
        help="on: answers are right or wrong by the ground truth; off: every answer is right, "
        "as without it (off)",
    )  # fmt: skip
    group.add_argument(
        "--signal", type=_rate, default=0.5, metavar="S",
        help="0..1: the share of a request's difficulty (within its kind) that observable "
        "signals explain: length, hard words, structure; the rest is hidden noise (0.5)",
    )  # fmt: skip
    defaults = ", ".join(f"{m}={s:g}" for m, s in truth.DEFAULT_SKILLS.items())
    group.add_argument(
        "--skill", type=parse_skill, action="append", default=[], metavar="MODEL=SKILL",
        help=f"a model's skill, 0 to {MAX_SKILL:g} on the difficulty scale (0-10); repeatable "
        f"(defaults: {defaults})",
    )  # fmt: skip
    group.add_argument(
        "--json-visible", type=_rate, default=0.6, metavar="P",
        help="the chance a wrong answer to a request for JSON fails a parse (half) or schema "
        "(half) check; other wrong answers look right (0.6)",
    )  # fmt: skip
    group.add_argument(
        "--classifier-accuracy", type=_rate, default=0.8, metavar="P",
        help="the chance the router classifier prompt is answered with the right tier, else a "
        "neighbouring one (0.8)",
    )  # fmt: skip


def parse_skill(text: str) -> tuple[str, float]:
    """--skill's type: `claude-haiku-5-5=3.5`."""
    model, sep, value = text.partition("=")
    try:
        skill = float(value)
    except ValueError:
        sep = ""
    if not sep:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not MODEL=SKILL, e.g. claude-haiku-5-5=3.5; models: {', '.join(PRICES)}"
        )
    try:
        check_skills({model.strip(): skill})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return model.strip(), skill


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds of 0 or more")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate between 0 and 1, e.g. 0.05")
    return value


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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        table = limits.table_of(args.limit)
    except ValueError as exc:
        parser.error(f"argument --limit: {exc}")
    try:
        check_batch_rates(args.batch_error_rate, args.batch_expiry_rate)
    except ValueError as exc:
        parser.error(f"arguments --batch-error-rate, --batch-expiry-rate: {exc}")
    settings = Settings(
        latency_ms=args.latency_ms, fault_rate=args.fault_rate, seed=args.seed,
        limits=table, otpm_mode=args.otpm_mode, batch_seconds=args.batch_seconds,
        batch_error_rate=args.batch_error_rate, batch_expiry_rate=args.batch_expiry_rate,
        spend_cap_reached=args.spend_cap_reached, slow_rate=args.slow_rate,
        slow_ms=args.slow_ms, quality=args.quality, signal=args.signal,
        skills=check_skills(dict(args.skill)), json_visible=args.json_visible,
        classifier_accuracy=args.classifier_accuracy,
    )  # fmt: skip
    asyncio.run(serve(args.host, args.port, settings))


if __name__ == "__main__":
    main()
