"""The checks on known files: exact verdicts and figures (``check.evaluate_symbol``, no Dagster)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from smallcaps_ingest.core import check, shape, store
from smallcaps_ingest.core.plan import Window

NS = 1_000_000_000
T0 = 1_710_165_600 * NS  # 2024-03-11 14:00 UTC


def _grid(event: int, seconds: int, quotes: list[tuple[int, bool]]) -> pl.DataFrame:
    """A 1 Hz quotes file: row k (ts = start + k + 1 s) carries quote ``quotes[k][0]`` (its sequence
    number; repeated = carried forward through a quiet second), crossed when ``quotes[k][1]``."""
    start = T0 + event * 3600 * NS
    rows = {
        "ts": [start + (k + 1) * NS for k in range(seconds)],
        "sip_timestamp": [start + k * NS + seq for k, (seq, _) in enumerate(quotes)],
        "bid_price": [10.02 if crossed else 10.0 for _, crossed in quotes],
        "ask_price": [10.01 for _ in quotes],
        "bid_size": [1.0] * seconds,
        "ask_size": [1.0] * seconds,
        "bid_exchange": [1] * seconds,
        "ask_exchange": [2] * seconds,
        "sequence_number": [seq for seq, _ in quotes],
        "quote_count": [1] * seconds,
    }
    return pl.DataFrame(rows).with_columns(
        pl.from_epoch(c, "ns").dt.replace_time_zone("UTC") if t == shape.TS else pl.col(c).cast(t)
        for c, t in shape.QUOTES_SCHEMA.items()
    )


def _event(data: Path, event: int, quotes: list[tuple[int, bool]]) -> Window:
    start = T0 + event * 3600 * NS
    w = Window(f"XYZ_TEST_{event}", start, start + len(quotes) * NS)
    no_trades = pl.DataFrame(schema=shape.TRADES_SCHEMA)
    store.write_event(data, "XYZ", w.event_id, no_trades, _grid(event, len(quotes), quotes))
    return w


def _bid_le_ask(data: Path, windows: list[Window]) -> check.CheckOutcome:
    out = {r.name: r for r in check.evaluate_symbol(data, "XYZ", windows, 1.0)}
    assert [n for n, r in out.items() if not r.passed and n != "quotes_bid_le_ask"] == []
    return out["quotes_bid_le_ask"]


def test_crossed_allowance_is_the_share_plus_three_sigma() -> None:
    assert check.crossed_allowance(0) == 0
    assert check.crossed_allowance(45) == pytest.approx(0.9 + 3 * (45 * 0.02 * 0.98) ** 0.5)
    assert int(check.crossed_allowance(45)) == 3
    assert int(check.crossed_allowance(200_000)) == 4187  # 4,000 + 3 x 62.6: the share dominates


def test_a_crossed_quote_carried_through_quiet_seconds_counts_once(tmp_path: Path) -> None:
    # 45 rows, 20 distinct quotes; quote 7 is crossed and carried over 10 seconds (10 rows = 22 %)
    seqs = [*range(1, 7), *([7] * 10), *range(8, 22)][:45]
    seqs += [seqs[-1]] * (45 - len(seqs))
    w = _event(tmp_path, 0, [(s, s == 7) for s in seqs])
    got = _bid_le_ask(tmp_path, [w])
    assert got.passed
    assert got.metadata == {
        "share": 0.952381,  # 1 - 1/21
        "distinct_quotes": 21,
        "crossed": 1,
        "crossed_allowed": 2,
        "quote_rows": 45,
        "min_share": 0.98,
    }


def test_crossed_beyond_the_allowance_fails(tmp_path: Path) -> None:
    # two events of 45 distinct quotes each: 90 quotes allow 1.8 + 3 x 1.33 = 5.78, so 5 pass, 6 fail
    w0 = _event(tmp_path, 0, [(s, s <= 3) for s in range(1, 46)])
    w1 = _event(tmp_path, 1, [(s, s <= 2) for s in range(1, 46)])
    got = _bid_le_ask(tmp_path, [w0, w1])
    assert got.passed and (got.metadata["crossed"], got.metadata["crossed_allowed"]) == (5, 5)
    # the same sequence numbers in two events are two quotes (each event is judged on its own rows)
    w1 = _event(tmp_path, 1, [(s, s <= 3) for s in range(1, 46)])
    got = _bid_le_ask(tmp_path, [w0, w1])
    assert not got.passed and got.severity == "WARN"
    assert (got.metadata["distinct_quotes"], got.metadata["crossed"]) == (90, 6)


def test_swapped_bid_and_ask_fail_even_on_a_short_window(tmp_path: Path) -> None:
    w = _event(tmp_path, 0, [(s, True) for s in range(1, 21)])
    got = _bid_le_ask(tmp_path, [w])
    assert not got.passed and got.metadata["share"] == 0.0 and got.metadata["crossed"] == 20


def _trades(event: int, rows: list[tuple[int, int, float]]) -> pl.DataFrame:
    """A trades file of (second, sequence_number, price) rows; the other fields constant."""
    start = T0 + event * 3600 * NS
    return pl.DataFrame(
        {
            "sip_timestamp": [start + s * NS for s, _, _ in rows],
            "participant_timestamp": [start + s * NS for s, _, _ in rows],
            "price": [p for _, _, p in rows],
            "size": [100.0] * len(rows),
            "exchange": [4] * len(rows),
            "tape": [1] * len(rows),
            "conditions": [[12]] * len(rows),
            "sequence_number": [q for _, q, _ in rows],
            "id": [str(q) for _, q, _ in rows],
            "trf_timestamp": [None] * len(rows),
            "trf_id": [None] * len(rows),
            "correction": [None] * len(rows),
        }
    ).with_columns(
        pl.from_epoch(c, "ns").dt.replace_time_zone("UTC") if t == shape.TS else pl.col(c).cast(t)
        for c, t in shape.TRADES_SCHEMA.items()
    )


def test_sequence_unique_reports_genuine_duplicates_and_changes_nothing(tmp_path: Path) -> None:
    """Number 2 on two different trades, number 3 on two trades identical in every field, and
    number 5 three times (two identical): a WARN with the counts and examples; files untouched."""
    windows = []
    for event, rows in (
        (0, [(1, 1, 10.0), (2, 2, 10.0), (3, 2, 10.1), (4, 3, 10.2), (4, 3, 10.2), (5, 4, 10.0)]),
        (1, [(1, 5, 9.0), (1, 5, 9.0), (2, 5, 9.5), (3, 6, 9.5)]),
        (2, [(1, 1, 8.0), (2, 2, 8.0)]),  # the same numbers as event 0, in another event: fine
    ):
        w = Window(f"XYZ_TEST_{event}", T0 + event * 3600 * NS, T0 + event * 3600 * NS + 10 * NS)
        no_quotes = pl.DataFrame(schema=shape.QUOTES_SCHEMA)
        store.write_event(tmp_path, "XYZ", w.event_id, _trades(event, rows), no_quotes)
        windows.append(w)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*.parquet"))}
    out = {r.name: r for r in check.evaluate_symbol(tmp_path, "XYZ", windows, 1.0)}
    seq = out["sequence_unique"]
    assert not seq.passed and seq.severity == "WARN"
    assert seq.metadata == {
        "failing": 2,
        "checked": 3,
        "examples": "XYZ_TEST_0, XYZ_TEST_1",
        "duplicate_rows": 4,  # 1 + 1 in event 0, 2 in event 1
        "identical_rows": 2,  # event 0's number 3, one of event 1's number 5
        "duplicate_examples": "XYZ_TEST_0 sequence_number 2: 2 rows, 2 distinct; "
        "XYZ_TEST_0 sequence_number 3: 2 rows, 1 distinct; XYZ_TEST_1 sequence_number 5: 3 rows, 2 distinct",
    }
    assert [n for n, r in out.items() if not r.passed] == ["sequence_unique"]
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*.parquet"))} == before
