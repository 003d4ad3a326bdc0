"""The checks on known files: exact verdicts and figures (``check.evaluate_symbol``, no Dagster)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from smallcaps_ingest import check, shape, store
from smallcaps_ingest.plan import Window

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
