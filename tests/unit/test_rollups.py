"""What one outcome adds to the rollups, and how deltas merge (no server)."""

from __future__ import annotations

import struct

import numpy as np

from worker.cells import (
    BOUNDS_MS,
    INDEX,
    METRICS,
    UNKNOWN,
    Settings,
    bucket,
    metrics_of,
    nano_usd,
    tenant_slot,
)
from worker.contract import UsageEvent, to_fields
from worker.report import percentiles, row
from worker.rollups import Delta

SETTINGS = Settings(features=frozenset({"summarize"}), tenants_per_hour=3)


def event(**kw: object) -> dict[str, str]:
    base: dict[str, object] = {"ts_ms": 1_764_500_000_000, "job_id": "j", "feature": "summarize",
                               "tenant": "acme", "priority": "normal", "model": "m"}  # fmt: skip
    return to_fields(UsageEvent(**{**base, **kw}))  # type: ignore[arg-type]


def test_nano_usd_is_exact_for_the_usage_streams_decimals() -> None:
    assert nano_usd("0.0000221") == 22_100
    assert nano_usd("1.2345678905") == 1_234_567_891  # half up at the tenth decimal
    assert nano_usd("12") == 12 * 10**9
    assert nano_usd("0") == 0 and nano_usd("junk") == 0 and nano_usd("1e-9") == 1


def test_an_answered_realtime_job() -> None:
    m = metrics_of(event(input_tokens=100, output_tokens=20, cache_read_input_tokens=900,
                         cost_usd=0.0012, baseline_cost_usd=0.05, latency_ms=840, queue_ms=12,
                         response_cache="miss"))  # fmt: skip
    assert m == {"n": 1, "jor": 1, "ti": 100, "to": 20, "tr": 900, "usd": 1_200_000,
                 "base": 50_000_000, "q4": 1, "qs": 12, "rm": 1, "pr": 1,
                 f"l{bucket(840)}": 1, "ls": 840}  # fmt: skip


def test_errors_cache_hits_batches_and_alerts() -> None:
    assert metrics_of(event(status="error", error_type="malformed_job", queue_ms=0)) == {
        "n": 1, "jer": 1, "q0": 1}  # fmt: skip
    hit = metrics_of(event(mode="cache", response_cache="hit", baseline_cost_usd=0.01))
    assert hit is not None and hit["joc"] == 1 and hit["rh"] == 1 and "usd" not in hit
    assert not any(k.startswith("l") for k in hit)  # no API call, no latency
    batch = metrics_of(event(mode="batch", latency_ms=3_600_000))
    assert batch is not None and batch["job"] == 1 and "ls" not in batch
    assert metrics_of(event(kind="alert", job_id="")) is None


def test_buckets_cover_every_duration() -> None:
    assert bucket(0) == 0 and bucket(1) == 0 and bucket(2) == 1 and bucket(3) == 2
    assert bucket(BOUNDS_MS[-1]) == len(BOUNDS_MS) - 1
    assert bucket(10**12) == len(BOUNDS_MS)  # the +Inf bucket


def test_tenants_are_stored_small_and_printable() -> None:
    assert tenant_slot("acme") == "acme"
    assert tenant_slot("a\nb\x1fc") == "a?b?c"
    assert tenant_slot(b"ac\xffme".decode("utf-8", "surrogateescape")) == "ac?me"
    long = tenant_slot("x" * 10_000)
    assert len(long) == 64 and long != tenant_slot("x" * 9_999)


def test_deltas_merge_and_unknown_features_are_bounded() -> None:
    one, two, both = Delta(SETTINGS), Delta(SETTINGS), Delta(SETTINGS)
    for n in range(5):
        e = event(tenant=f"t{n % 2}", input_tokens=n, cost_usd=0.001)
        (one if n < 3 else two).add(e)
        both.add(e)
    one.merge(two)
    assert one.hours == both.hours
    stray = Delta(SETTINGS)
    stray.add(event(feature="anything-a-producer-sends"))
    [(_, feature, *_)] = stray.hours
    assert feature == UNKNOWN


def test_a_delta_is_one_record_per_cell() -> None:
    d = Delta(SETTINGS)
    for tenant in ("a", "b", "a"):
        d.add(event(tenant=tenant, input_tokens=10))
    first, second = d.records()  # what a fold applies (fold.lua reads them)
    hour, label, size = struct.unpack("<I10sH", first[:16])
    assert hour == 1_764_500_000_000 // 3_600_000 and label == b"2025113010"
    assert first[16 : 16 + size].decode().split("\x1f") == ["summarize", "m", "normal", "a"]
    pairs = struct.unpack("<" + "Bd" * ((len(first) - 16 - size) // 9), first[16 + size :])
    assert dict(zip(pairs[::2], pairs[1::2], strict=True))[INDEX["n"]] == 2  # two outcomes
    assert dict(zip(pairs[::2], pairs[1::2], strict=True))[INDEX["ti"]] == 20
    assert second[16:].startswith(b"summarize\x1fm\x1fnormal\x1fb")


def test_rows_and_percentiles_from_a_vector() -> None:
    v = [0] * len(METRICS)
    for name, value in {"n": 4, "jor": 2, "job": 1, "jer": 1, "usd": 3 * 10**9,
                        "base": 4 * 10**9, "rh": 1, "rm": 1, "l6": 2}.items():  # fmt: skip
        v[INDEX[name]] = value
    r = row(v)
    assert (r["jobs"], r["ok"], r["errors"]) == (4, 3, 1)
    assert r["saved_usd"] == 1.0 and r["saved_pct"] == 0.25 and r["batch_share"] == 0.25
    assert r["response_cache_hit_rate"] == 0.5 and r["prompt_cache_hit_rate"] is None
    assert r["latency_p50_ms"] is not None and 50 <= r["latency_p50_ms"] <= 100
    assert percentiles(np.zeros((1, len(BOUNDS_MS) + 1), np.int64), 0.5) == [None]
