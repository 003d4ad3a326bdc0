"""The HTTP client over real HTTP: against the bundled simulator, and a local server for gzip."""

from __future__ import annotations

import gzip
import json
import logging
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

from smallcaps_ingest.core import shape
from smallcaps_ingest.core.polygon.budget import RequestBudget
from smallcaps_ingest.core.polygon.client import PolygonAuthError, PolygonClient, PolygonError
from smallcaps_ingest.core.polygon.stats import FetchStats
from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import REPO, TEST_KEY, ns, truth_frame

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
    from smallcaps_ingest.core.polygon.client import _ByteBudget

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


def _takes(bodies: object, n: int, share: int) -> list[int]:
    """Takes ``n`` shares of a byte budget on a thread; what it got within 5 s (it may block)."""
    got: list[int] = []
    t = threading.Thread(target=lambda: got.extend(bodies.take(share) for _ in range(n)),  # type: ignore[attr-defined]
                         daemon=True)
    t.start()
    t.join(5 if n > 1 else 0.3)
    return got


def test_every_worker_streams_its_body_at_once(tmp_path: Path) -> None:
    """The byte bound never makes one worker's streamed page wait for another's: at 40 workers
    (more than BODY_BYTES_IN_FLIGHT streams side by side) each still gets its share at once."""
    from smallcaps_ingest.core.polygon.client import BODY_BYTES_IN_FLIGHT, STREAMED_BODY_BYTES

    for workers in (4, 40):
        budget = RequestBudget(10.0, tmp_path / f"b{workers}.sqlite")
        c = PolygonClient("http://127.0.0.1:9", TEST_KEY, budget, workers=workers)
        held = _takes(c._bodies, workers, STREAMED_BODY_BYTES)
        assert len(held) == workers, f"{workers} workers: only {len(held)} bodies streamed at once"
        assert c._bodies.used == workers * STREAMED_BODY_BYTES
        assert c._bodies.limit == max(BODY_BYTES_IN_FLIGHT, workers * STREAMED_BODY_BYTES)
        assert _takes(c._bodies, 1, c._bodies.limit) == []  # a body read whole waits: the bound holds
        for n in held:
            c._bodies.give(n)
        c.close()
        budget.close()


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


def test_two_processes_share_one_budget(tmp_path: Path) -> None:
    """Two OS processes, one budget file: never more than the budget in any second at the server."""
    with Simulator(SimConfig(latency_ms=5)) as s:
        script = textwrap.dedent(f"""
            import sys
            from smallcaps_ingest.core.polygon.budget import RequestBudget
            from smallcaps_ingest.core.polygon.client import PolygonClient
            from smallcaps_ingest.core.polygon.stats import FetchStats
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


class _Quiet(BaseHTTPRequestHandler):
    base = ""  # the server's URL, set by _fetch_from

    def log_message(self, *args: object) -> None:
        pass


def _fetch_from(handler: type[_Quiet], ticker: str, tmp_path: Path) -> tuple[pl.DataFrame, FetchStats]:
    """``fetch_range`` of ``ticker``'s trades from a local server answering with ``handler``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.base = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = PolygonClient(handler.base, TEST_KEY, RequestBudget(50, tmp_path / "b.sqlite"), workers=1,
                          read_timeout=10)
        stats = FetchStats()
        got = c.fetch_range("trades", ticker, 1_700_000_000_000_000_000, 1_700_000_001_000_000_000, stats)
        c.close()
    finally:
        server.shutdown()
        server.server_close()
    return got, stats


def test_gzip_bodies_are_decoded_and_a_short_gzip_body_is_retried(tmp_path: Path) -> None:
    """The real API gzips when asked (requests asks). A page is decoded as it streams in, gunzipped
    on the way; one cut short of its Content-Length is a truncated body, retried, never half a
    page."""
    rows = [{"sip_timestamp": 1_700_000_000_000_000_000 + i, "sequence_number": i + 1, "price": 1.5,
             "size": 100, "exchange": 4, "id": str(i)} for i in range(5000)]
    pages = {
        "/v3/trades/GZIP": {"results": rows[:3000], "status": "OK",
                            "next_url": "__BASE__/v3/trades/GZIP?cursor=two"},
        "/v3/trades/GZIP?cursor=two": {"results": rows[3000:], "status": "OK"},
    }
    served: list[tuple[str, str, bool]] = []
    cut_once = {"/v3/trades/GZIP?cursor=two"}

    class Handler(_Quiet):
        def do_GET(self) -> None:  # noqa: N802
            key = self.path.split("&", 1)[0] if "cursor" in self.path else self.path.split("?", 1)[0]
            page = json.dumps(pages[key]).replace("__BASE__", self.base).encode()
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

    got, stats = _fetch_from(Handler, "GZIP", tmp_path)
    assert got.height == 5000 and got["sequence_number"].to_list() == list(range(1, 5001))
    assert got["id"].to_list() == [str(i) for i in range(5000)]
    first, second = "/v3/trades/GZIP", "/v3/trades/GZIP?cursor=two"
    assert [(k, short) for k, _, short in served] == [(first, False), (second, True), (second, False)]
    assert all("gzip" in enc for _, enc, _ in served)
    assert stats.as_dict()["retries_by_cause"] == {"truncated": 1}, stats.as_dict()
    assert stats.pages == 2 and stats.total_requests == 3


def test_a_page_that_does_not_decode_in_pieces_is_asked_again_and_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids holding the piece marker ``},{``: decoding the page as it streams in cuts inside a
    string, which is invalid JSON (never other rows), and the body is gone by then; the client
    asks for the page once more and reads it whole. Every row arrives, exactly once."""
    from smallcaps_ingest.core.polygon import pages as pages_mod

    monkeypatch.setattr(pages_mod, "PIECE_BYTES", 64)
    rows = [{"sip_timestamp": 1_700_000_000_000_000_000 + i, "sequence_number": i + 1, "price": 1.5,
             "size": 100, "id": f"{i}}},{{x"} for i in range(300)]
    body = json.dumps({"results": rows, "status": "OK"}, separators=(",", ":")).encode()
    served: list[str] = []

    class Handler(_Quiet):
        def do_GET(self) -> None:  # noqa: N802
            served.append(self.path.split("?", 1)[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    got, stats = _fetch_from(Handler, "MARK", tmp_path)
    assert got["id"].to_list() == [f"{i}}},{{x" for i in range(300)]
    assert served == ["/v3/trades/MARK"] * 2 and stats.retries == {"truncated": 1} and stats.pages == 1
