"""What a rollup cell holds, and how the cells of a finished period are stored.

A cell is one (feature, model, priority, tenant) of one period. It holds integer metrics
(METRICS): outcomes by status and mode, tokens by kind, cost and baseline in nano-dollars
(exact sums), response- and prompt-cache counts, and two histograms with the fixed buckets
BOUNDS_MS (API latency of realtime calls, queue wait of every job), so percentiles of any
set of cells merge by adding buckets. `metric_pairs` says what one usage event adds.

While an hour runs its cells are small Redis hashes (worker.rollups). A finished period is
stored as a Block: its cells as a sparse matrix, (cell, metric, amount) triples in numpy
arrays, packed and compressed into one value (`encode`), about 80 bytes a cell. Summing
blocks by any grouping of their cells (`sum_by`) is a few numpy operations however many
cells they hold, which is what lets `tokenq report` read 90 days in a fraction of a second.

A view of a block keeps some dimensions of its cells and adds up the others (VIEWS): a day
is stored in five views so that a question about tenants alone reads 100 cells a day, not
the day's thousands, and its hours' `all` views in one block (HOURS) so that a question by
hour reads one value a day, not 24.
"""

from __future__ import annotations

import bisect
import hashlib
import time
import unicodedata
import zlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import msgspec
import numpy as np
from numpy.typing import NDArray

BOUNDS_MS = (*(m * 10**e for e in range(8) for m in (1, 2, 5)), 100_000_000)
"""Histogram bucket upper bounds in ms, 1-2-5 steps from 1 ms to 27.8 hours (and above)."""

JOBS = tuple(f"j{s}{m}" for s in "oe" for m in "rbc")
"""Outcomes by status (o: ok, e: error) and mode (r: realtime, b: batch, c: cache)."""
TOKENS = ("ti", "to", "tw", "tr")  # input, output, cache write, cache read
MONEY = ("usd", "base")  # cost and baseline cost, nano-dollars
RCACHE = ("rh", "rj", "rm")  # response cache: hit, joined an identical call, miss
PCACHE = ("pr", "pw")  # calls that read the prompt cache; that only wrote it
LATENCY = tuple(f"l{k}" for k in range(len(BOUNDS_MS) + 1))
WAIT = tuple(f"q{k}" for k in range(len(BOUNDS_MS) + 1))
SUMS = ("ls", "qs")  # the histograms' sums, ms
METRICS = ("n", *JOBS, *TOKENS, *MONEY, *RCACHE, *PCACHE, *LATENCY, *WAIT, *SUMS)
"""Every metric of a cell; a metric's number is its place here."""
INDEX = {name: n for n, name in enumerate(METRICS)}
WIDTH = len(METRICS)

OTHER = "\x1eother"
"""The tenant of outcomes past a period's tenant rows (control characters cannot occur in a
stored dimension, see tenant_slot)."""
UNKNOWN = "\x1eunknown"
"""The feature of outcomes whose feature is not in the config (a producer's mistake)."""
ALL = "\x1eall"
"""A dimension a view adds up (every feature, model, priority or tenant together)."""
SEP = "\x1f"
"""Separates the dimensions of a cell: feature, model, priority, tenant."""
NANO = 1_000_000_000
TENANT_MAX = 64
CELL_BYTES = 1_300
"""The most memory one cell of a running hour takes in Redis with every metric set (its
hash, key, expiry and index entry); a typical cell takes 250-400 bytes."""


@dataclass(frozen=True, slots=True)
class Settings:
    """What the rollups need from the config ([report], [metrics], [features])."""

    retention_days: int = 90
    tenants_per_hour: int = 100
    tenant_totals: bool = False
    features: frozenset[str] = frozenset()


def max_cells_per_hour(settings: Settings, models: int, priorities: int) -> int:
    """The most cells an hour can have: (tenants + none + other) x (features + unknown) x
    models x priorities. With CELL_BYTES, the bound of a running hour's memory."""
    return (settings.tenants_per_hour + 2) * (len(settings.features) + 1) * models * priorities


def hour_of(ts_ms: int) -> int:
    """Hours since the epoch (UTC) of a unix time in ms."""
    return ts_ms // 3_600_000


@lru_cache(maxsize=4096)
def hour_label(hour: int) -> str:
    """An hour as it appears in key names: YYYYMMDDHH (UTC)."""
    return time.strftime("%Y%m%d%H", time.gmtime(hour * 3600))


def day_label(day: int) -> str:
    """A day (days since the epoch, UTC) as it appears in key names: YYYYMMDD."""
    return time.strftime("%Y%m%d", time.gmtime(day * 86_400))


def bucket(ms: int) -> int:
    """The histogram bucket of a duration: the first whose upper bound is >= ms."""
    return bisect.bisect_left(BOUNDS_MS, ms)


def nano_usd(text: str) -> int:
    """A usage event's fixed-point dollar string as integer nano-dollars (half up)."""
    whole, _, frac = text.partition(".")
    if len(frac) <= 9 and whole.isdecimal() and (frac.isdecimal() or not frac):
        return int(whole) * NANO + int(frac.ljust(9, "0"))  # exact: the usual case
    whole, _, frac = text.strip().partition(".")
    try:
        units = int(whole or "0") * 10**10 + int((frac + "0" * 10)[:10] or "0")
    except ValueError:
        try:
            return round(float(text) * NANO)
        except ValueError:
            return 0
    return (units + 5) // 10 if units >= 0 else -((-units + 5) // 10)


def _int(text: str | None) -> int:
    """A count as a usage event writes it; 0 for anything else."""
    if not text:
        return 0
    if text.isdecimal():
        return int(text)
    try:
        return max(0, int(text))
    except ValueError:
        return 0


@lru_cache(maxsize=4096)
def tenant_slot(tenant: str) -> str:
    """A tenant (or model, or priority) as stored: control characters and lone surrogates
    (bytes that were not UTF-8) replaced, long names shortened with a digest (producers may
    send anything; what is stored stays small, printable and valid UTF-8)."""
    clean = "".join("?" if unicodedata.category(c) in ("Cc", "Cs") else c for c in tenant)
    if len(clean) <= TENANT_MAX:
        return clean
    digest = hashlib.sha256(tenant.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{clean[: TENANT_MAX - 17]}~{digest}"


_N, _QS, _LS, _PR, _PW = (INDEX[name] for name in ("n", "qs", "ls", "pr", "pw"))
_MODES = {"batch": 1, "cache": 2}  # else realtime: 0
_JOB = tuple(tuple(INDEX[f"j{s}{m}"] for m in "rbc") for s in "eo")  # [ok][mode]
_TOKEN_FIELDS = (
    ("input_tokens", INDEX["ti"]),
    ("output_tokens", INDEX["to"]),
    ("cache_creation_input_tokens", INDEX["tw"]),
    ("cache_read_input_tokens", INDEX["tr"]),
)
_MONEY_FIELDS = (("cost_usd", INDEX["usd"]), ("baseline_cost_usd", INDEX["base"]))
_ANSWERS = {"hit": INDEX["rh"], "joined": INDEX["rj"], "miss": INDEX["rm"]}
_TW, _TR = INDEX["tw"], INDEX["tr"]
_Q0, _L0 = INDEX["q0"], INDEX["l0"]


def metric_pairs(fields: Mapping[str, str]) -> list[int] | None:
    """What one usage event (its stream fields) adds to its cell: metric number, amount,
    metric number, amount... ('n' first, no zero amounts); None for events that are not job
    outcomes (budget alerts). The finishing write calls this for every job: it is written
    for speed (a few microseconds: few calls, the usual field values parsed inline)."""
    get = fields.get
    if get("kind", "job") != "job":
        return None
    ok = get("status") == "ok"
    mode = _MODES.get(get("mode", ""), 0)
    out = [_N, 1, _JOB[ok][mode], 1]
    add = out.extend
    prompt = _amounts(get, add)
    text = get("queue_ms")
    wait = int(text) if text and text.isdecimal() else _int(text)
    add((_Q0 + bisect.bisect_left(BOUNDS_MS, wait), 1))
    if wait:
        add((_QS, wait))
    if ok:
        _answered(get, add, mode, prompt)
    return out


def _amounts(get: Callable[[str], str | None], add: Callable[[tuple[int, int]], None]) -> int:
    """Add the tokens and money of an event; its prompt-cache metric (_PR, _PW or 0)."""
    prompt = 0
    for name, code in _TOKEN_FIELDS:
        text = get(name)
        if text and text != "0":
            value = int(text) if text.isdecimal() else _int(text)
            if value:
                add((code, value))
                prompt = _PR if code == _TR else _PW if code == _TW and not prompt else prompt
    for name, code in _MONEY_FIELDS:
        text = get(name)
        if text and text != "0":
            value = nano_usd(text)
            if value:
                add((code, value))
    return prompt


def _answered(get: Callable[[str], str | None], add: Callable[[tuple[int, int]], None],
              mode: int, prompt: int) -> None:  # fmt: skip
    """The metrics only answered jobs have: cache hits and the call's latency."""
    answer = _ANSWERS.get(get("response_cache") or "")
    if answer is not None:
        add((answer, 1))
    if prompt:
        add((prompt, 1))
    if mode == 0:  # only realtime calls have an API latency
        text = get("latency_ms")
        latency = int(text) if text and text.isdecimal() else _int(text)
        add((_L0 + bisect.bisect_left(BOUNDS_MS, latency), 1))
        if latency:
            add((_LS, latency))


def metrics_of(fields: Mapping[str, str]) -> dict[str, int] | None:
    """metric_pairs by metric name: what one usage event adds to its cell."""
    pairs = metric_pairs(fields)
    if pairs is None:
        return None
    return {METRICS[n]: value for n, value in zip(pairs[::2], pairs[1::2], strict=True)}


def split(dims: str) -> tuple[str, str, str, str] | None:
    """A cell's stored dimensions as (feature, model, priority, tenant); None if not a cell."""
    parts = dims.split(SEP)
    return (parts[0], parts[1], parts[2], parts[3]) if len(parts) == 4 else None


# -- finished periods: blocks of cells --

_TRIPLE = 4 + 1 + 8  # bytes of a (cell uint32, metric uint8, amount int64) triple
MAX_BLOCK_BYTES = 256 * 2**20
"""A stored block that would unpack to more is not ours (a compression bomb); a block holds
at most a few MB."""


class _Stored(msgspec.Struct, array_like=True, frozen=True):
    """A block as stored: msgpack [dims, zlib(cells as uint32, metrics as uint8, amounts
    as int64, little-endian, one array after the other)]."""

    dims: list[str]
    triples: bytes


_stored = msgspec.msgpack.Decoder(_Stored)


@dataclass(frozen=True, slots=True, eq=False)
class Block:
    """The cells of one period as a sparse matrix: cell k has the dimensions dims[k]
    (SEP-joined) and, for each i with cell[i] == k, metric[i]'s amount[i] (triples naming the
    same cell and metric add up)."""

    dims: list[str]
    cell: NDArray[np.uint32]
    metric: NDArray[np.uint8]
    amount: NDArray[np.int64]

    def encode(self) -> bytes:
        """The block as stored in Redis (see decode)."""
        packed = (self.cell.astype("<u4").tobytes() + self.metric.tobytes()
                  + self.amount.astype("<i8").tobytes())  # fmt: skip
        return msgspec.msgpack.encode(_Stored(self.dims, zlib.compress(packed, 1)))

    def dense(self) -> NDArray[np.int64]:
        """The block as a (cells x METRICS) matrix."""
        out = np.zeros(len(self.dims) * WIDTH, np.int64)
        np.add.at(out, self.cell.astype(np.int64) * WIDTH + self.metric, self.amount)
        return out.reshape(len(self.dims), WIDTH)

    def vectors(self) -> dict[str, list[int]]:
        """Each cell's metrics, in METRICS order."""
        return dict(zip(self.dims, self.dense().tolist(), strict=True))


EMPTY = Block([], np.zeros(0, np.uint32), np.zeros(0, np.uint8), np.zeros(0, np.int64))


def decode(raw: bytes | None) -> Block | None:
    """A stored block; None for a missing value or one that is not a block (another
    program's: it is skipped, never trusted)."""
    if not raw:
        return None
    try:
        stored = _stored.decode(raw)
        unpack = zlib.decompressobj()
        data = unpack.decompress(stored.triples, MAX_BLOCK_BYTES)
    except (msgspec.DecodeError, zlib.error):
        return None
    n, rest = divmod(len(data), _TRIPLE)
    if rest or unpack.unconsumed_tail or not unpack.eof:
        return None
    block = Block(
        stored.dims,
        np.frombuffer(data, "<u4", n, 0),
        np.frombuffer(data, "u1", n, 4 * n),
        np.frombuffer(data, "<i8", n, 5 * n),
    )
    if n and (int(block.cell.max()) >= len(block.dims) or int(block.metric.max()) >= WIDTH):
        return None
    return block


def build(cells: Iterable[tuple[str, Sequence[int]]]) -> Block:
    """A block of cells given as (dims, [metric number, amount, metric number, ...])."""
    dims: list[str] = []
    cell: list[int] = []
    pairs: list[int] = []
    for dims_text, flat in cells:
        cell += [len(dims)] * (len(flat) // 2)
        pairs += flat[: len(flat) // 2 * 2]
        dims.append(dims_text)
    both = np.array(pairs, np.int64).reshape(-1, 2)
    return Block(dims, np.array(cell, np.uint32), both[:, 0].astype(np.uint8), both[:, 1].copy())


def of_dense(dims: list[str], matrix: NDArray[np.int64]) -> Block:
    """A block of a (cells x METRICS) matrix, keeping its non-zero amounts."""
    cell, metric = np.nonzero(matrix)
    return Block(dims, cell.astype(np.uint32), metric.astype(np.uint8), matrix[cell, metric])


K = TypeVar("K", bound=Hashable)


def sum_by(parts: Iterable[tuple[Block, Callable[[str], K | None]]]) -> dict[K, NDArray[np.int64]]:
    """Add up the cells of several blocks by group: each block comes with the function that
    gives a cell's group from its dims (None leaves the cell out). Each group's metrics, in
    METRICS order (int64: exact). A function given with several blocks is called once per
    distinct dims (90 days of a day view repeat the same few thousand)."""
    index: dict[K, int] = {}
    memos: dict[Callable[[str], K | None], dict[str, int]] = {}

    def slot(group: K | None) -> int:
        return -1 if group is None else index.setdefault(group, len(index))

    flat: list[NDArray[np.int64]] = []
    amounts: list[NDArray[np.int64]] = []
    for block, key in parts:
        if not len(block.amount):
            continue
        memo = memos.setdefault(key, {})
        for dims in set(block.dims).difference(memo):
            memo[dims] = slot(key(dims))
        groups = np.fromiter(map(memo.__getitem__, block.dims), np.int64, len(block.dims))
        of_triple = groups[block.cell]
        amount, metric = block.amount, block.metric
        if (of_triple < 0).any():
            kept = of_triple >= 0
            of_triple, amount, metric = of_triple[kept], amount[kept], metric[kept]
        flat.append(of_triple * WIDTH + metric)
        amounts.append(amount)
    sums = np.zeros(len(index) * WIDTH, np.int64)
    if flat:
        np.add.at(sums, np.concatenate(flat), np.concatenate(amounts))
    matrix = sums.reshape(len(index), WIDTH)
    return {group: matrix[n] for group, n in index.items()}


def regroup(parts: Iterable[tuple[Block, Callable[[str], str | None]]]) -> Block:
    """sum_by, as a block whose cells are the groups (dims)."""
    sums = sum_by(parts)
    if not sums:
        return EMPTY
    return of_dense(list(sums), np.stack(list(sums.values())))


def keep_tenants(block: Block, keep: int) -> Block:
    """The block with rows for its `keep` biggest tenants by spend (then outcomes) only; the
    others' cells count under OTHER. Unchanged when it has no more tenants than that."""
    by_tenant = sum_by([(block, lambda d: d.rpartition(SEP)[2])])
    named = [t for t in by_tenant if t not in ("", OTHER)]
    if len(named) <= keep:
        return block
    ranked = sorted(named, key=lambda t: (by_tenant[t][INDEX["usd"]], by_tenant[t][INDEX["n"]]),
                    reverse=True)  # fmt: skip
    kept = {"", OTHER, *ranked[:keep]}

    def slot(dims: str) -> str:
        head, _, tenant = dims.rpartition(SEP)
        return dims if tenant in kept else f"{head}{SEP}{OTHER}"

    return regroup([(block, slot)])


VIEWS: dict[str, tuple[str, ...]] = {
    "all": ("feature", "model", "priority"),
    "tenant": ("tenant",),
    "feature-tenant": ("feature", "tenant"),
    "model-tenant": ("model", "tenant"),
    "cells": ("feature", "model", "priority", "tenant"),
}
"""The views of a finished period, smallest first: which dimensions each keeps (the others
are ALL). A day has all five, a finished hour `all` and `cells`."""
_DIMENSIONS = ("feature", "model", "priority", "tenant")


def view(block: Block, name: str) -> Block:
    """A view of a block (VIEWS): its cells with the dimensions the view drops added up."""
    kept = [d in VIEWS[name] for d in _DIMENSIONS]
    if all(kept):
        return block

    def slot(dims: str) -> str | None:
        parts = split(dims)
        if parts is None:
            return None
        return SEP.join(p if k else ALL for p, k in zip(parts, kept, strict=True))

    return regroup([(block, slot)])


HOURS = "hours"
"""A day's field holding its hours' `all` views in one block: each cell's dims prefixed with
its hour of the day, two digits, and SEP (so a question by hour reads a key a day)."""


def hours_view(hours: Iterable[tuple[int, Block]]) -> Block:
    """The HOURS view of a day: its hours' `all` views given as (hour of the day, block)."""
    dims: list[str] = []
    cells, metrics, amounts = [], [], []
    for hour, block in hours:
        cells.append(block.cell.astype(np.uint32) + len(dims))
        metrics.append(block.metric)
        amounts.append(block.amount)
        dims += [f"{hour:02d}{SEP}{d}" for d in block.dims]
    if not dims:
        return EMPTY
    return Block(dims, np.concatenate(cells), np.concatenate(metrics), np.concatenate(amounts))


def view_for(needs: Iterable[str], among: Sequence[str]) -> str:
    """The first view among these that keeps every dimension needed."""
    wanted = set(needs)
    return next(name for name in among if wanted <= set(VIEWS[name]))
