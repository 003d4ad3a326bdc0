"""The synthetic market: a deterministic tape, its wire schema, sessions, closed days, liquidity,
sequence numbers that restart every day and the tape's genuine duplicates, served exactly as
``ground_truth`` says."""

from __future__ import annotations

import json

from smallcaps_ingest import simulator as simmod
from smallcaps_ingest.simulator import SimConfig, Simulator, ground_truth, liquidity
from smallcaps_ingest_tests.simulator.conftest import (
    DAY,
    DAY_END,
    DAY_START,
    FIXTURES,
    NS,
    RTH_OPEN,
    get,
    ns,
    pages_of,
    strip_id,
)


def test_determinism_across_instances_and_cold_cache() -> None:
    params = {"timestamp.gte": RTH_OPEN, "timestamp.lt": RTH_OPEN + 120 * NS, "limit": 5000}
    with Simulator() as a:
        first = get(a, "trades", "AAOI", **params).json()
    simmod.clear_cache()
    with Simulator() as b:
        second = get(b, "trades", "AAOI", **params).json()
    assert strip_id(first) == strip_id(second)
    assert len(first["results"]) > 50
    assert first["results"][::-1] == ground_truth("trades", "AAOI", RTH_OPEN, RTH_OPEN + 120 * NS)


def test_rows_match_fixture_schema(sim: Simulator) -> None:
    fx_t = json.loads((FIXTURES / "v3/trades/AAPL&limit=2.json").read_text())["results"][0]
    fx_q = json.loads((FIXTURES / "v3/quotes/AAPL.json").read_text())["results"][0]
    trades = ground_truth("trades", "BRK.B", RTH_OPEN, RTH_OPEN + 300 * NS)
    quotes = ground_truth("quotes", "BRK.B", RTH_OPEN, RTH_OPEN + 60 * NS)
    for rows, fx, optional in ((trades, fx_t, set()), (quotes, fx_q, {"conditions", "indicators"})):
        for row in rows:
            assert set(row) <= set(fx) | optional
            for k, v in row.items():
                if k in fx:
                    assert type(v) is type(fx[k]) or {type(v), type(fx[k])} == {int, float}, k
    required_t = {"exchange", "id", "participant_timestamp", "price", "sequence_number", "sip_timestamp"}
    assert all(required_t | {"size", "tape"} <= set(r) for r in trades)
    omitted = sum("conditions" not in r for r in trades) / len(trades)
    assert 0.3 < omitted < 0.5
    for r in trades:
        assert r["participant_timestamp"] < r["sip_timestamp"]
        assert isinstance(r["price"], float) and r["price"] > 0
        if r["exchange"] == 4:
            assert r["trf_timestamp"] < r["participant_timestamp"] and isinstance(r["trf_id"], int)
        else:
            assert "trf_id" not in r
    seqs = [r["sequence_number"] for r in trades]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len({r["tape"] for r in trades + quotes}) == 1
    crossed = sum(r["bid_price"] >= r["ask_price"] for r in quotes) / len(quotes)
    assert crossed < 0.02
    assert all(isinstance(r["bid_size"], int) and isinstance(r["ask_size"], int) for r in quotes)


def test_locked_crossed_quotes_exist() -> None:
    rows = ground_truth("quotes", "HVY", RTH_OPEN + 3600 * NS, RTH_OPEN + 3660 * NS)
    frac = sum(r["bid_price"] >= r["ask_price"] for r in rows) / len(rows)
    assert 0.001 < frac < 0.015


def test_sequence_numbers_restart_every_trading_day_and_pages_may_end_at_a_day(fresh: Simulator) -> None:
    """Sequence numbers restart every ET day (the real API's do), so a two-day range repeats
    numbers; ``page_ends_at_day`` ends each page after a day's last row (fewer rows than the
    limit, with a next_url). Every row is served once, in order, whatever the page size."""
    lo, hi = ns(2024, 3, 5, 5), ns(2024, 3, 7, 5)  # Tue and Wed, 00:00 ET to 00:00 ET
    truth = ground_truth("trades", "XELB", lo, hi)
    tue = [r for r in truth if r["sip_timestamp"] < DAY_END]
    wed = truth[len(tue) :]
    assert tue and wed and {r["sequence_number"] for r in tue} & {r["sequence_number"] for r in wed}
    assert min(r["sequence_number"] for r in wed) < max(r["sequence_number"] for r in tue)
    fresh.config.page_ends_at_day = True
    for limit in (50_000, len(tue), 97):
        pages = pages_of(fresh, "trades", "XELB", {"order": "asc", "timestamp.gte": lo, "timestamp.lt": hi,
                                                  "limit": limit})
        assert [r for p in pages for r in p] == truth, limit
        # every page holds one day; the day's last page ends with its last row
        assert all(len({r["sip_timestamp"] < DAY_END for r in p}) == 1 for p in pages), limit
        assert any(p[-1] == tue[-1] for p in pages) and len(pages) >= 2
    fresh.config.page_ends_at_day = False
    assert pages_of(fresh, "trades", "XELB", {"order": "asc", "timestamp.gte": lo, "timestamp.lt": hi,
                                            "limit": 50_000}) == [truth]  # one page, no next_url


def test_duplicate_sequence_numbers_and_identical_trades_are_served_as_ground_truth_says(
    fresh: Simulator,
) -> None:
    """The two knobs add the tape's genuine duplicates to trades: reused sequence numbers (a
    different trade each) and trades served twice, identical in every field. Deterministic, in
    ``ground_truth`` exactly as served (asc and desc, any page size: the cursor counts positions,
    not sequence numbers), and the plain tape underneath is unchanged."""
    cfg = SimConfig(duplicate_sequence_rate=0.05, identical_trade_rate=0.03)
    lo, hi = RTH_OPEN, RTH_OPEN + 20 * 60 * NS
    dup = ground_truth("trades", "AAOI", lo, hi, cfg)
    plain = ground_truth("trades", "AAOI", lo, hi)
    assert dup == ground_truth("trades", "AAOI", lo, hi, SimConfig(**vars(cfg)))  # deterministic
    minute = (lo, lo + 60 * NS)
    assert ground_truth("quotes", "AAOI", *minute, cfg) == ground_truth("quotes", "AAOI", *minute)  # trades
    twins = sum(a == b for a, b in zip(dup, dup[1:], strict=False))
    reused = sum(
        a["sequence_number"] == b["sequence_number"] and a != b for a, b in zip(dup, dup[1:], strict=False)
    )
    assert 0.015 * len(plain) < twins < 0.05 * len(plain), (twins, len(plain))
    assert 0.03 * len(plain) < reused < 0.08 * len(plain), (reused, len(plain))
    assert len(dup) == len(plain) + twins
    # the plain tape underneath: same trades, only the reused numbers differ
    once = [r for i, r in enumerate(dup) if i == 0 or r != dup[i - 1]]
    strip = [{k: v for k, v in r.items() if k != "sequence_number"} for r in once]
    assert strip == [{k: v for k, v in r.items() if k != "sequence_number"} for r in plain]
    fresh.config.duplicate_sequence_rate = cfg.duplicate_sequence_rate
    fresh.config.identical_trade_rate = cfg.identical_trade_rate
    for order, limit in (("asc", 50_000), ("asc", 37), ("desc", 41)):
        pages = pages_of(fresh, "trades", "AAOI", {"order": order, "timestamp.gte": lo, "timestamp.lt": hi,
                                                  "limit": limit})
        rows = [r for p in pages for r in p]
        assert (rows if order == "asc" else rows[::-1]) == dup, (order, limit)


def test_dead_and_weekend_have_no_rows(sim: Simulator) -> None:
    assert liquidity("DEAD") == 0.0 and liquidity("ZZZZ") == 0.0
    assert 0.05 <= liquidity("SOMETKR") <= 3.0
    for kind in ("trades", "quotes"):
        assert "results" not in get(sim, kind, "DEAD", timestamp=DAY).json()
        assert "results" not in get(sim, kind, "AAOI", timestamp="2024-03-09").json()
        assert "results" not in get(sim, kind, "AAOI", timestamp="2024-03-10").json()
        assert ground_truth(kind, "ZZZZ", DAY_START, DAY_END) == []
    # Unbounded queries terminate and land on the latest session.
    assert "results" not in get(sim, "trades", "DEAD").json()
    assert len(get(sim, "trades", "AAOI", limit=5).json()["results"]) == 5


def test_sessions_and_dense_ticker() -> None:
    pre = ground_truth("trades", "AAOI", ns(2024, 3, 5, 8, 50), ns(2024, 3, 5, 9, 10))  # 03:50-04:10 ET
    assert pre and min(r["sip_timestamp"] for r in pre) >= ns(2024, 3, 5, 9)
    late = ground_truth("trades", "AAOI", ns(2024, 3, 6, 0, 50), ns(2024, 3, 6, 1, 10))  # 19:50-20:10 ET
    assert late and max(r["sip_timestamp"] for r in late) < ns(2024, 3, 6, 1)
    hvy = ground_truth("quotes", "HVY", RTH_OPEN + 3600 * NS, RTH_OPEN + 4200 * NS)
    assert len(hvy) > 50_000


def test_hvy_requires_paging(sim: Simulator) -> None:
    params = {"timestamp.gte": RTH_OPEN, "timestamp.lt": RTH_OPEN + 600 * NS, "limit": 50000}
    body = get(sim, "quotes", "HVY", **params).json()
    assert len(body["results"]) == 50000 and "next_url" in body
