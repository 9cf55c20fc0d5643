"""`tokenq report`: its arguments, its table and CSV (no server)."""

from __future__ import annotations

import argparse
import csv
import io

import pytest

from worker.cells import INDEX, METRICS
from worker.cli import build_parser, report_query
from worker.errors import ConfigError
from worker.report import Answer, report_csv, row, table

NOW_MS = 1_764_554_400_000  # 2025-12-01T02:00:00Z


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["report", *argv])


def test_periods_are_whole_hours_and_default_to_a_week() -> None:
    q = report_query(args(), NOW_MS)
    assert (q.end_hour - q.start_hour, q.by) == (7 * 24, ())
    q = report_query(args("--since", "12h", "--by", "feature,tenant", "--by", "day"), NOW_MS)
    assert (q.end_hour - q.start_hour, q.by) == (12, ("feature", "tenant", "day"))
    q = report_query(args("--from", "2025-11-30", "--to", "2025-11-30T13:30"), NOW_MS)
    assert (q.start_hour * 3600, q.end_hour * 3600) == (1_764_460_800, 1_764_460_800 + 14 * 3600)
    assert report_query(args("--tenant", "a\nb"), NOW_MS).tenant == "a?b"  # as stored


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("--by", "colour"), "--by colour is not a dimension; use feature, model"),
        (("--since", "7x"), "--since '7x' is not a period; use e.g. 12h, 7d or 4w"),
        (("--since", "0d"), "is not a period"),
        (("--from", "yesterday"), "--from 'yesterday' is not a date or time"),
        (("--since", "1d", "--from", "2025-11-01"), "give --since or --from/--to, not both"),
        (("--from", "2025-12-02"), "the period is empty"),
    ],
)
def test_bad_arguments_say_what_to_write(argv: tuple[str, ...], says: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        report_query(args(*argv), NOW_MS)
    assert says in str(err.value)


def answer() -> Answer:
    v = [0] * len(METRICS)
    for name, value in {"n": 3, "jor": 2, "jer": 1, "usd": 1_500_000, "base": 6_000_000,
                        "ti": 900, "to": 100, "l7": 2}.items():  # fmt: skip
        v[INDEX[name]] = value
    rows = [{"feature": "summarize", **row(v)}, {"feature": "faq, shared", **row(v)}]
    return Answer(rows=rows, total=row([2 * x for x in v]))


def test_the_table_has_a_total_and_readable_cells() -> None:
    text = table(answer(), ["feature"])
    head, first, _, total = text.splitlines()
    assert head.split()[:4] == ["feature", "jobs", "ok", "errors"]
    assert "$0.001500" in first and "75%" in first and "1,000" in first
    assert total.startswith("total") and "$0.003000" in total
    assert table(Answer(), ["feature"]) == "no job outcomes in this period"


def test_csv_has_every_column_and_quotes_what_needs_it() -> None:
    rows = list(csv.DictReader(io.StringIO(report_csv(answer(), ["feature"]))))
    assert [r["feature"] for r in rows] == ["summarize", "faq, shared"]
    assert rows[0]["cost_usd"] == "0.0015" and rows[0]["input_tokens"] == "900"
    assert rows[0]["prompt_cache_hit_rate"] == ""  # no calls used it
