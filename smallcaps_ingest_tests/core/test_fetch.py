"""The HTTP client and the fetch engine, over real HTTP against the bundled simulator."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
import requests

from smallcaps_ingest.core import fetch, shape, store
from smallcaps_ingest.core.fetch import (
    NBBO_SCHEMA,
    FetchEngine,
    FetchStats,
    PageDecodeError,
    PolygonAuthError,
    PolygonClient,
    PolygonError,
    parse_page,
)
from smallcaps_ingest.core.plan import DensityStore, Window
from smallcaps_ingest.core.polygon.budget import RequestBudget
from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import FIXTURES, REPO, TEST_KEY, ns, truth_frame

MIN = 60_000_000_000


def _assert_exact(got: pl.DataFrame, kind: str, ticker: str, lo: int, hi: int) -> None:
    want = truth_frame(kind, ticker, lo, hi)
    assert want.height > 0
    assert got["sequence_number"].n_unique() == got.height, "duplicates"
    assert got.height == want.height, "gaps or extra rows"
    assert got.equals(want)


def test_pagination_is_exact_under_a_page_cap(sim: Simulator, client: PolygonClient) -> None:
    sim.config.page_cap = 700
    lo, hi = ns("2024-03-05T14:30:00"), ns("2024-03-05T14:45:00")
    stats = FetchStats()
    got = client.fetch_range("quotes", "BRK.B", lo, hi, stats)
    _assert_exact(got, "quotes", "BRK.B", lo, hi)
    assert stats.pages == -(-got.height // 700) >= 10
    assert stats.requests["quotes"] == stats.pages
    log = sim.request_log()
    assert all(r.cursor for r in log[1:]) and not log[0].cursor
    assert not any(r.had_api_key_in_query for r in log)


def test_a_netrc_entry_for_the_host_does_not_replace_the_key(
    sim: Simulator, client: PolygonClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests looks a session without ``auth`` up in ~/.netrc (or $NETRC) on every request; an
    entry for the API host would replace the Bearer header with Basic credentials (401s)."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password not-the-key\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    sim.config.page_cap = 300
    lo, hi = ns("2024-03-05T14:30:00"), ns("2024-03-05T14:35:00")
    got = client.fetch_range("trades", "BRK.B", lo, hi, FetchStats())
    _assert_exact(got, "trades", "BRK.B", lo, hi)
    log = sim.request_log()
    assert len(log) >= 2 and {r.status for r in log} == {200}  # next_url pages carry the key too
    assert "not-the-key" not in repr(client.session.auth) and TEST_KEY not in repr(client.session.auth)


def test_desc_default_is_handled(sim: Simulator, client: PolygonClient) -> None:
    lo, hi = ns("2024-03-05T15:00:00"), ns("2024-03-05T15:03:00")
    raw = requests.get(
        f"{sim.base_url}/v3/trades/AAOI",
        params={"timestamp.gte": lo, "timestamp.lt": hi, "limit": 50000},
        headers={"Authorization": f"Bearer {TEST_KEY}"},
        timeout=10,
    ).json()["results"]
    stamps = [r["sip_timestamp"] for r in raw]
    assert stamps == sorted(stamps, reverse=True) and len(stamps) > 10  # the server's default is desc
    got = client.fetch_range("trades", "AAOI", lo, hi, FetchStats())
    _assert_exact(got, "trades", "AAOI", lo, hi)  # ascending, as we asked


def test_empty_window_and_dead_ticker(client: PolygonClient) -> None:
    lo = ns("2024-03-05T15:00:00")
    got = client.fetch_range("trades", "DEAD", lo, lo + 10 * MIN, FetchStats())
    assert got.height == 0 and got.schema == pl.Schema(shape.RAW_TRADES_SCHEMA)


def test_key_never_in_logged_urls_or_exceptions(
    sim: Simulator, budget: RequestBudget, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim.config.page_cap = 200
    c = PolygonClient(sim.base_url, TEST_KEY, budget)
    lo = ns("2024-03-05T15:00:00")
    c.fetch_range("trades", "AAOI", lo, lo + 5 * MIN, FetchStats())
    sim.config.keys = {"someone-else": "advanced"}
    with pytest.raises(PolygonAuthError) as auth:
        c.fetch_range("trades", "AAOI", lo, lo + MIN, FetchStats())
    dead = PolygonClient("http://127.0.0.1:9", TEST_KEY, budget, max_retries=1, connect_timeout=0.5)
    with pytest.raises(PolygonError) as conn:
        dead.fetch_range("trades", "AAOI", lo, lo + MIN, FetchStats())
    assert "GET /v3/trades/AAOI" in caplog.text  # urllib3 did log the URLs...
    for text in (caplog.text, str(auth.value), repr(auth.value), str(conn.value), repr(c)):
        assert TEST_KEY not in text  # ...but never the key


def test_auth_errors_name_the_plan_and_are_not_retried(sim: Simulator, budget: RequestBudget) -> None:
    sim.config.keys = {TEST_KEY: "developer"}
    c = PolygonClient(sim.base_url, TEST_KEY, budget)
    lo = ns("2024-03-05T15:00:00")
    assert c.fetch_range("trades", "AAOI", lo, lo + MIN, FetchStats()).height > 0
    stats = FetchStats()
    with pytest.raises(PolygonAuthError, match="Stocks Advanced"):
        c.fetch_range("quotes", "AAOI", lo, lo + MIN, stats)
    assert stats.requests["quotes"] == 1
    assert sim.counters()["requests"]["quotes"] == {"403": 1}
    with pytest.raises(PolygonAuthError, match="no Polygon API key"):
        PolygonClient(sim.base_url, "", budget)


def test_429_storm_completes_exactly(sim: Simulator, tmp_path: Path) -> None:
    sim.config.rate_limit_rps = 8
    sim.config.page_cap = 400
    budget = RequestBudget(40, tmp_path / "b.sqlite")  # 5x what the server allows
    c = PolygonClient(sim.base_url, TEST_KEY, budget, workers=8)
    lo, hi = ns("2024-03-05T14:30:00"), ns("2024-03-05T14:40:00")
    stats = FetchStats()
    got = c.fetch_range("trades", "BRK.B", lo, hi, stats)
    _assert_exact(got, "trades", "BRK.B", lo, hi)
    assert stats.throttled > 0
    assert stats.throttled == sum(v.get("429", 0) for v in sim.counters()["requests"].values())
    import sqlite3

    with sqlite3.connect(tmp_path / "b.sqlite") as db:  # AIMD cut the shared rate (it recovers since)
        ((cut_rate,),) = db.execute("SELECT rate FROM aimd").fetchall()
    assert cut_rate < 40


def test_429_without_retry_after(sim: Simulator, tmp_path: Path) -> None:
    sim.config.rate_limit_rps = 2
    sim.config.rate_limit_retry_after = False
    sim.config.page_cap = 150
    c = PolygonClient(sim.base_url, TEST_KEY, RequestBudget(30, tmp_path / "b.sqlite"))
    lo, hi = ns("2024-03-05T15:00:00"), ns("2024-03-05T15:10:00")
    stats = FetchStats()
    _assert_exact(c.fetch_range("trades", "AAOI", lo, hi, stats), "trades", "AAOI", lo, hi)
    assert stats.throttled > 0


def test_truncated_bodies_are_retried(sim: Simulator, client: PolygonClient) -> None:
    sim.config.truncate_rate = 0.3
    sim.config.page_cap = 500
    lo, hi = ns("2024-03-05T14:30:00"), ns("2024-03-05T14:40:00")
    stats = FetchStats()
    got = client.fetch_range("quotes", "AAOI", lo, hi, stats)
    _assert_exact(got, "quotes", "AAOI", lo, hi)
    assert stats.retries["truncated"] > 0
    assert stats.retries["truncated"] == sim.counters()["faults"]["truncated"]
    assert client._bodies.used == 0  # every body's bytes went back to the byte budget


def test_body_byte_budget_bounds_concurrent_bodies() -> None:
    """Bodies larger than the budget take all of it; takes block until enough is given back."""
    from smallcaps_ingest.core.fetch import _ByteBudget

    b = _ByteBudget(100)
    assert b.take(60) == 60
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(b.take(500)))
    t.start()
    time.sleep(0.2)
    assert got == []  # 60 of 100 in use: a body needing all of it waits
    b.give(60)
    t.join(5)
    assert got == [100] and b.used == 100  # capped at the whole budget
    b.give(100)
    assert b.used == 0


def test_resets_and_5xx_are_retried_through_the_budget(sim: Simulator, client: PolygonClient) -> None:
    sim.config.error_5xx_rate = 0.1
    sim.config.reset_rate = 0.1
    sim.config.page_cap = 300
    lo, hi = ns("2024-03-05T14:30:00"), ns("2024-03-05T14:40:00")
    stats = FetchStats()
    got = client.fetch_range("trades", "BRK.B", lo, hi, stats)
    _assert_exact(got, "trades", "BRK.B", lo, hi)
    faults = sim.counters()["faults"]
    assert stats.retries["5xx"] == faults["5xx"] > 0
    assert stats.retries["reset"] == faults["reset"] > 0
    # every HTTP request, retries included, took a budget grant and was counted
    assert stats.requests["trades"] == sim.counters()["total"]


def test_fixture_payloads_parse(page_reader: str) -> None:
    trades, nxt = parse_page("trades", (FIXTURES / "v3/trades/AAPL&limit=2.json").read_bytes())
    assert nxt is None and trades.height == 2
    assert trades.schema == pl.Schema(shape.RAW_TRADES_SCHEMA)
    row = trades.row(0, named=True)
    assert row["conditions"] == [12, 37] and row["id"] == "183276" and row["trf_id"] == 3
    assert row["correction"] == 1 and row["sip_timestamp"] == 1651181822461979400 and row["size"] == 10.0
    page1, next1 = parse_page("quotes", (FIXTURES / "v3/quotes/AAPL.json").read_bytes())
    cursor_file = next((FIXTURES / "v3/quotes").glob("AAPL&cursor=*.json"))
    page2, next2 = parse_page("quotes", cursor_file.read_bytes())
    assert next1 is not None and "cursor=" in next1 and next2 is None
    assert page1.height == page2.height == 10
    both = pl.concat([page1, page2])
    assert both["sequence_number"].n_unique() == 20
    assert page1["sequence_number"].min() > page2["sequence_number"].max()  # desc pages
    for name in (
        "openapi-examples/v3_trades_stockTicker_200.json",
        "openapi-examples/v3_quotes_stockTicker_200.json",
    ):
        kind = "trades" if "trades" in name else "quotes"
        df, nxt = parse_page(kind, (FIXTURES / name).read_bytes())
        assert df.height == 2 and nxt
    # shaping the fixture trades gives the documented schema
    shaped = shape.shape_trades(trades, 0, 2**62)
    assert shaped.schema == pl.Schema(shape.TRADES_SCHEMA)
    assert parse_page("trades", b'{"status":"OK","request_id":"x"}')[0].height == 0  # results missing


@pytest.fixture(params=["polars", "pieces", "pyarrow"])
def page_reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a parse test through each way ``parse_page`` reads a page: polars on the whole body,
    polars on pieces cut between rows (tiny pieces here, so every page is cut many times), and
    pyarrow, the fallback."""
    if request.param == "polars":
        monkeypatch.setattr(fetch, "PIECE_BYTES", 1 << 40)
    elif request.param == "pieces":
        monkeypatch.setattr(fetch, "PIECE_BYTES", 64)
    else:
        def fail(body: bytes, schema: object) -> None:
            raise pl.exceptions.ComputeError("polars refused the page")

        monkeypatch.setattr(fetch, "_read_pieces", fail)
    return str(request.param)


def _trades_body(ids: list[str], nested: bool) -> bytes:
    rows = []
    for i, tid in enumerate(ids):
        extra = ',"nested":{"list":[{"a":1},{"b":[{"c":2},{"d":3}]}]}' if nested and i % 3 == 0 else ""
        rows.append(f'{{"sip_timestamp":{1_700_000_000_000_000_000 + i},"sequence_number":{i + 1},'
                    f'"price":{i}.5,"size":{i},"conditions":[{i},1],"id":"{tid}"{extra}}}')
    return ('{"status":"OK","next_url":"http://h/v3?cursor=c","results":[' + ",".join(rows)
            + '],"request_id":"r"}').encode()


def test_parse_page_pieces_never_cut_inside_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose strings hold the cut marker (``},{``), escaped quotes and nested objects: at every
    piece size the frame equals pyarrow's whole-page read. A wrong cut must fall back, never
    return other rows; a body cut short stays an error."""
    ids = ["7", "a},{b", 'q\\"},{\\"', "}", "{", "x},{"]
    body = _trades_body([ids[i % len(ids)] for i in range(40)], nested=True)
    want, want_next = fetch._read_arrow(body, fetch._PAGE_SCHEMAS["trades"])
    assert want is not None and want.height == 40 and want_next == "http://h/v3?cursor=c"
    assert {"a},{b", 'q"},{"', "x},{"} <= set(want["id"].to_list())  # the marker inside strings
    for size in range(1, len(body) + 2, 7):
        monkeypatch.setattr(fetch, "PIECE_BYTES", size)
        got, nxt = parse_page("trades", body)
        assert got.equals(want) and nxt == want_next, size
        with pytest.raises(PageDecodeError):
            parse_page("trades", body[: len(body) // 2 + size % 97])
    # plain rows are read in pieces at every size, never by the fallback
    clean = _trades_body([str(i) for i in range(40)], nested=False)
    fallbacks: list[int] = []
    arrow = fetch._read_arrow
    monkeypatch.setattr(fetch, "_read_arrow", lambda b, sch: fallbacks.append(len(b)) or arrow(b, sch))
    whole = arrow(clean, fetch._PAGE_SCHEMAS["trades"])[0]
    assert whole is not None and whole.height == 40
    for size in range(1, len(clean) + 2, 5):
        monkeypatch.setattr(fetch, "PIECE_BYTES", size)
        assert parse_page("trades", clean)[0].equals(whole)
    assert fallbacks == [], fallbacks


def test_parse_page_finds_the_rows_end_and_next_url_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows are read up to the page's last ``}]``. When that mark sits in a later field (here a
    string), the rows piece is invalid and pyarrow reads the page whole: the frame is still right.
    A body cut short after its rows, or with text after its object, stays an error."""
    rows = _trades_body([str(i) for i in range(12)], nested=False)
    want, _ = fetch._read_arrow(rows, fetch._PAGE_SCHEMAS["trades"])
    assert want is not None and want.height == 12
    fallbacks: list[int] = []
    arrow = fetch._read_arrow
    monkeypatch.setattr(fetch, "_read_arrow", lambda b, sch: fallbacks.append(len(b)) or arrow(b, sch))
    inner = rows[rows.index(b'"results":[') : rows.rindex(b"]") + 1]
    for body, n_fallbacks in (
        (b'{"next_url":"http://h/n","status":"OK",' + inner + b"}", 0),  # next_url first
        (b"{" + inner + b',"next_url":"http://h/n","status":"OK"}', 0),  # next_url last
        (b"{" + inner + b',"request_id":"r}]x","next_url":"http://h/n"}', 1),  # a "}]" after the rows
    ):
        got, nxt = parse_page("trades", body)
        assert got.equals(want) and nxt == "http://h/n", body[-60:]
        assert len(fallbacks) == n_fallbacks, body[-60:]
        fallbacks.clear()
    for bad in (b"{" + inner + b',"next_url":"http://h', b"{" + inner + b"}}", b"{" + inner + b"} x",
                b"{" + inner + b',"next_url":7}'):
        with pytest.raises(PageDecodeError, match="invalid trades page"):
            parse_page("trades", bad)


def test_parse_page_edge_cases_and_errors(page_reader: str) -> None:
    body = (b'{"results":[{"sip_timestamp":1517562000015577088,"price":5,"size":100,"conditions":[1,2],'
            b'"id":"7","sequence_number":3,"unknown_field":{"a":[1]}}],"next_url":"http://h/v3?cursor=c",'
            b'"status":"OK","request_id":"r"}')
    df, nxt = parse_page("trades", body)
    assert nxt == "http://h/v3?cursor=c" and df.schema == pl.Schema(shape.RAW_TRADES_SCHEMA)
    row = df.row(0, named=True)
    # integers in float columns are widened; a nanosecond stamp above 2**53 stays exact
    assert row["price"] == 5.0 and row["size"] == 100.0 and row["sip_timestamp"] == 1517562000015577088
    assert row["conditions"] == [1, 2] and row["tape"] is None
    for empty in (b'{"results":[]}', b'{"results":null}', b'{"status":"OK"}'):
        frame, nxt = parse_page("quotes", empty, nbbo_only=True)
        assert frame.height == 0 and nxt is None and frame.schema == pl.Schema(NBBO_SCHEMA)
    quotes = (b'{"results":[{"sip_timestamp":2,"sequence_number":9,"bid_price":1.5,"ask_price":1.6,'
              b'"indicators":[4]}]}')
    slim, _ = parse_page("quotes", quotes, nbbo_only=True)
    assert slim.columns == list(NBBO_SCHEMA) and slim.row(0)[:4] == (2, 9, 1.5, 1.6)
    full, _ = parse_page("quotes", quotes)
    assert full.row(0, named=True)["indicators"] == [4]
    for bad in (body[:57], b"", b"<html>502</html>", b"[1,2]", b'{"results":[{"sip_timestamp":"x"}]}',
                b'{"results":[]}\n{"results":[]}'):
        with pytest.raises(PageDecodeError, match="invalid trades page"):
            parse_page("trades", bad)


def test_parse_page_matches_stdlib_json_on_a_simulator_page(client: PolygonClient, page_reader: str) -> None:
    url = f"{client.base_url}/v3/trades/AAOI"
    resp = client.session.get(url, params={"timestamp.gte": ns("2024-03-05T15:00:00Z"),
                                           "timestamp.lt": ns("2024-03-05T15:10:00Z"), "order": "asc",
                                           "limit": 50000}, timeout=30)
    rows = json.loads(resp.content)["results"]
    df, _ = parse_page("trades", resp.content)
    assert df.height == len(rows) > 100
    for col in shape.RAW_TRADES_SCHEMA:
        want = [r.get(col) for r in rows]
        got = df[col].to_list()
        assert got == [float(w) if isinstance(w, int) and col in ("price", "size") else w for w in want], col


def test_engine_writes_exact_files_and_resumes(sim: Simulator, client: PolygonClient, tmp_path: Path) -> None:
    base = ns("2024-03-05T15:00:00")
    windows = [
        Window("A1", base - 3 * MIN, base + 7 * MIN),
        Window("A2", base + 2 * MIN, base + 12 * MIN),  # overlaps A1
        Window("A3", base + 90 * MIN, base + 100 * MIN),
        Window("A4", ns("2024-03-06T20:58:00"), ns("2024-03-06T21:08:00")),  # AH, next day
    ]
    dead = [Window("D1", base, base + 10 * MIN)]
    data = tmp_path / "data"
    engine = FetchEngine(client, str(data), workers=4, hz=1.0, density=DensityStore(data / "_state/d.json"))
    outcomes = {o.symbol: o for o in engine.run({"AAOI": windows, "DEAD": dead})}
    assert outcomes["AAOI"].written == 4 and outcomes["DEAD"].written == 1 and outcomes["DEAD"].empty == 1
    for w in windows:
        d = store.event_dir(data, "AAOI", w.event_id)
        trades = pl.read_parquet(d / "trades.parquet")
        want = shape.shape_trades(truth_frame("trades", "AAOI", w.start_ns, w.end_ns), w.start_ns, w.end_ns)
        assert trades.height == want.height > 0 and trades.equals(want)
        quotes = pl.read_parquet(d / "quotes.parquet")
        qwant = shape.shape_quotes(
            truth_frame("quotes", "AAOI", w.start_ns, w.end_ns), w.start_ns, w.end_ns, 1.0
        )
        assert quotes.equals(qwant) and quotes.height == 600  # a liquid ten-minute window
    empty = store.event_dir(data, "DEAD", "D1")
    assert pl.read_parquet(empty / "trades.parquet").schema == pl.Schema(shape.TRADES_SCHEMA)
    assert pl.read_parquet(empty / "quotes.parquet").height == 0
    assert json.loads((data / "_source.json").read_text()) == {"source": "simulator"}
    # resume: delete one file; only that event is requested again
    (store.event_dir(data, "AAOI", "A3") / "quotes.parquet").unlink()
    sim.reset_counters()
    again = {o.symbol: o for o in engine.run({"AAOI": windows, "DEAD": dead})}
    assert again["AAOI"].skipped == 3 and again["AAOI"].written == 1 and again["DEAD"].skipped == 1
    log = sim.request_log()
    assert {(r.gte_ns, r.lt_ns) for r in log} == {(windows[2].start_ns, windows[2].end_ns)}
    assert len(log) == 2  # trades + quotes of A3 only


def test_engine_merges_requests(sim: Simulator, client: PolygonClient, tmp_path: Path) -> None:
    """Five events of a sparse name on one day: once its density is learned (day one), one
    request range per endpoint on day two, not ten."""
    engine = FetchEngine(client, str(tmp_path / "d"), workers=4, density=DensityStore(tmp_path / "dens.json"))
    for day, expect in ((ns("2024-03-05T14:00:00"), None), (ns("2024-03-06T14:00:00"), 2)):
        sim.reset_counters()
        ws = [Window(f"X{day}_{i}", day + i * 40 * MIN, day + i * 40 * MIN + 10 * MIN) for i in range(5)]
        (o,) = engine.run({"XELB": ws})
        assert o.written == 5
        assert o.stats.total_requests == sim.counters()["total"] <= 10
        if expect:
            assert o.stats.total_requests == expect
    assert json.loads((tmp_path / "dens.json").read_text())["XELB"]["quotes"]["RTH"][1] > 0


def test_engine_merges_a_sparse_name_across_days(
    sim: Simulator, client: PolygonClient, tmp_path: Path
) -> None:
    """XELB (liquidity 0.02, ~6,000 quotes a day): once its density is learned, five events from
    a Tuesday to the next Monday are one range per endpoint under a 50,000-row allowance (2
    requests, not 10), and every event's files are exactly the ground truth; with no allowance,
    one range per event and endpoint."""
    dens = tmp_path / "dens.json"
    teach = FetchEngine(client, str(tmp_path / "t"), workers=4, density=DensityStore(dens), overfetch_rows=0)
    (t,) = teach.run({"XELB": [Window("teach", ns("2024-02-05T15:00:00"), ns("2024-02-05T16:00:00"))]})
    assert t.written == 1
    days = ("2024-02-06", "2024-02-07", "2024-02-08", "2024-02-09", "2024-02-12")
    ws = [Window(f"x{i}", ns(f"{d}T15:00:00"), ns(f"{d}T15:10:00")) for i, d in enumerate(days)]
    for allowance, expect in ((50_000, 2), (0, 10)):
        sim.reset_counters()
        data = tmp_path / f"d{allowance}"
        engine = FetchEngine(
            client, str(data), workers=4, density=DensityStore(dens), overfetch_rows=allowance
        )
        (o,) = engine.run({"XELB": ws})
        assert o.error is None and o.written == 5
        assert o.stats.total_requests == sim.counters()["total"] == expect
        if expect == 2:
            assert {(r.gte_ns, r.lt_ns) for r in sim.request_log()} == {(ws[0].start_ns, ws[-1].end_ns)}
        for w in ws:
            d = store.event_dir(data, "XELB", w.event_id)
            trades = shape.shape_trades(
                truth_frame("trades", "XELB", w.start_ns, w.end_ns), w.start_ns, w.end_ns
            )
            quotes = shape.shape_quotes(
                truth_frame("quotes", "XELB", w.start_ns, w.end_ns), w.start_ns, w.end_ns, 1.0
            )
            assert quotes.height > 0
            assert pl.read_parquet(d / "trades.parquet").equals(trades)
            assert pl.read_parquet(d / "quotes.parquet").equals(quotes)


def test_engine_probes_a_new_symbol_before_merging_days(
    sim: Simulator, client: PolygonClient, tmp_path: Path
) -> None:
    """A symbol never seen: its first day is fetched alone (priors only, no allowance), and the
    other four days are planned once that probe taught the store XELB's level: one range per
    endpoint for all four. 4 requests, not 10 (or 2 ranges each spanning a week planned blind)."""
    days = ("2024-02-06", "2024-02-07", "2024-02-08", "2024-02-09", "2024-02-12")
    ws = [Window(f"p{i}", ns(f"{d}T15:00:00"), ns(f"{d}T15:10:00")) for i, d in enumerate(days)]
    engine = FetchEngine(client, str(tmp_path / "d"), workers=4, overfetch_rows=50_000)
    sim.reset_counters()
    (o,) = engine.run({"XELB": ws})
    assert o.error is None and o.written == 5
    log = sim.request_log()
    assert o.stats.total_requests == len(log) == 4
    assert [(r.gte_ns, r.lt_ns) for r in log[:2]] == [(ws[0].start_ns, ws[0].end_ns)] * 2  # the probe
    assert {(r.gte_ns, r.lt_ns) for r in log[2:]} == {(ws[1].start_ns, ws[-1].end_ns)}
    for w in ws:
        d = store.event_dir(tmp_path / "d", "XELB", w.event_id)
        want = shape.shape_trades(truth_frame("trades", "XELB", w.start_ns, w.end_ns), w.start_ns, w.end_ns)
        assert pl.read_parquet(d / "trades.parquet").equals(want)


def test_engine_failure_is_per_symbol(sim: Simulator, client: PolygonClient, tmp_path: Path) -> None:
    """A write failure fails its symbol only; other symbols complete and are reported."""
    data = tmp_path / "d"
    (data / "event_windows").mkdir(parents=True)
    (data / "event_windows" / "symbol=KOSS").write_text("not a directory")
    base = ns("2024-03-05T15:00:00")
    done: list[str] = []
    engine = FetchEngine(client, str(data), workers=4)
    out = {
        o.symbol: o
        for o in engine.run(
            {"AAOI": [Window("a", base, base + MIN)], "KOSS": [Window("k", base, base + MIN)]},
            on_symbol_done=lambda o: done.append(o.symbol),
        )
    }
    assert out["AAOI"].error is None and out["AAOI"].written == 1
    assert isinstance(out["KOSS"].error, OSError) and out["KOSS"].stats.errors["write"] == 1
    assert sorted(done) == ["AAOI", "KOSS"]
    assert not list((data / "event_windows").rglob("*.tmp*"))


def test_two_processes_share_one_budget(tmp_path: Path) -> None:
    """Two OS processes, one budget file: never more than the budget in any second at the server."""
    with Simulator(SimConfig(latency_ms=5)) as s:
        script = textwrap.dedent(f"""
            import sys
            from smallcaps_ingest.core.polygon.budget import RequestBudget
            from smallcaps_ingest.core.fetch import FetchStats, PolygonClient
            b = RequestBudget(20, {str(tmp_path / "shared.sqlite")!r}, bucket="sim")
            c = PolygonClient({s.base_url!r}, "k", b, workers=1)
            lo = 1709650800000000000
            st = FetchStats()
            for i in range(45):
                c.fetch_range("trades", "DEAD", lo + i, lo + i + 10, st)
            print(st.total_requests)
        """)
        procs = [
            subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=60)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert sum(int(o) for o in outs) == 90 == s.counters()["total"]
        assert s.max_in_window(1.0) <= 20
        log = s.request_log()
        span = log[-1].t - log[0].t
        assert span >= (90 - 20) / 20 * 0.99  # 90 requests at 20/s need >= 3.5 s


def test_fetch_windows_drops_gap_rows_and_counts_raw(client: PolygonClient) -> None:
    """A merged range keeps only the rows inside its events' windows; the raw count is every row."""
    lo = ns("2024-03-05T15:00:00")
    keep = [(lo, lo + 2 * MIN), (lo + 8 * MIN, lo + 10 * MIN)]
    got, raw = client.fetch_windows("trades", "AAOI", lo, lo + 10 * MIN, FetchStats(), keep=keep)
    truth = truth_frame("trades", "AAOI", lo, lo + 10 * MIN)
    inside = truth.filter(
        pl.any_horizontal([pl.col("sip_timestamp").is_between(a, b, closed="left") for a, b in keep])
    )
    assert raw == truth.height > inside.height > 0
    assert got.sort("sip_timestamp", "sequence_number")["sequence_number"].to_list() == (
        inside.sort("sip_timestamp", "sequence_number")["sequence_number"].to_list()
    )


def test_symbol_clock_starts_at_its_first_request(
    sim: Simulator, client: PolygonClient, tmp_path: Path
) -> None:
    """Per-symbol seconds (and events/min) count from the symbol's first request, not the run's start."""
    sim.config.latency_ms = 40.0
    base = ns("2024-03-05T15:00:00")
    work = {s: [Window(f"{s}1", base, base + MIN)] for s in ("AAOI", "BBIG", "CLOV", "DWAC", "EXPR", "FFIE")}
    engine = FetchEngine(client, str(tmp_path / "d"), workers=1)
    t0 = time.monotonic()
    outcomes = engine.run(work)
    total = time.monotonic() - t0
    starts = sorted(o.started for o in outcomes)
    assert starts[-1] - starts[0] > 0.2  # one worker: the last symbol started well after the first
    assert sum(o.seconds for o in outcomes) < 2.5 * total  # from the run's start it would be ~3.5x


def test_polars_allocator_returns_memory_unless_the_user_chose() -> None:
    code = "import os, smallcaps_ingest, polars; print(os.environ['_RJEM_MALLOC_CONF'])"
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    # polars appends the variable to its own defaults; jemalloc applies the last value of each key
    assert ours.stdout.strip().endswith("narenas:1,dirty_decay_ms:100,muzzy_decay_ms:0")
    env["_RJEM_MALLOC_CONF"] = "narenas:4"
    theirs = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert theirs.stdout.strip().endswith("narenas:4") and "dirty_decay_ms:100" not in theirs.stdout


def test_gzip_bodies_are_decoded_and_a_short_gzip_body_is_retried(tmp_path: Path) -> None:
    """The real API gzips when asked (requests asks). A page is read in one call
    (``fetch._read_body``): a gzip body is decoded whole; one cut short of its Content-Length is a
    truncated body, retried, never half a page."""
    rows = [{"sip_timestamp": 1_700_000_000_000_000_000 + i, "sequence_number": i + 1, "price": 1.5,
             "size": 100, "exchange": 4, "id": str(i)} for i in range(5000)]
    pages = {
        "/v3/trades/GZIP": {"results": rows[:3000], "status": "OK",
                            "next_url": "__BASE__/v3/trades/GZIP?cursor=two"},
        "/v3/trades/GZIP?cursor=two": {"results": rows[3000:], "status": "OK"},
    }
    served: list[tuple[str, str, bool]] = []
    cut_once = {"/v3/trades/GZIP?cursor=two"}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            key = self.path.split("&", 1)[0] if "cursor" in self.path else self.path.split("?", 1)[0]
            page = json.dumps(pages[key]).replace("__BASE__", base).encode()
            body = gzip.compress(page)
            short = key in cut_once
            cut_once.discard(key)
            served.append((key, self.headers.get("Accept-Encoding", ""), short))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if short else body)
            if short:
                self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        budget = RequestBudget(50, tmp_path / "b.sqlite")
        c = PolygonClient(base, TEST_KEY, budget, workers=1, read_timeout=10)
        stats = FetchStats()
        got = c.fetch_range("trades", "GZIP", 1_700_000_000_000_000_000, 1_700_000_001_000_000_000, stats)
        c.close()
    finally:
        server.shutdown()
        server.server_close()
    assert got.height == 5000 and got["sequence_number"].to_list() == list(range(1, 5001))
    assert got["id"].to_list() == [str(i) for i in range(5000)]
    first, second = "/v3/trades/GZIP", "/v3/trades/GZIP?cursor=two"
    assert [(k, short) for k, _, short in served] == [(first, False), (second, True), (second, False)]
    assert all("gzip" in enc for _, enc, _ in served)
    assert stats.as_dict()["retries_by_cause"] == {"truncated": 1}, stats.as_dict()
    assert stats.pages == 2 and stats.total_requests == 3
