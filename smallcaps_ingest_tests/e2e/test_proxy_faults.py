"""Two failure shapes real proxies produce (issue 16, part 6): a 502/504 whose body is a proxy's
HTML page, and a server that accepts a request and never answers (or stalls mid-body).

Real HTTP against the bundled simulator; exact against its ground truth.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import requests

from smallcaps_ingest.core import shape, store
from smallcaps_ingest.core.engine import FetchEngine
from smallcaps_ingest.core.plan import Window
from smallcaps_ingest.core.polygon import client as polygon_client
from smallcaps_ingest.core.polygon.budget import RequestBudget
from smallcaps_ingest.core.polygon.client import PolygonClient, PolygonError
from smallcaps_ingest.core.polygon.stats import FetchStats
from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import TEST_KEY, ns, truth_frame

LO, HI = ns("2024-03-05T14:30:00"), ns("2024-03-05T14:40:00")
READ_TIMEOUT = 0.4


@pytest.fixture
def quick(sim: Simulator, budget: RequestBudget) -> Iterator[PolygonClient]:
    """A client with a short read timeout, so a hung request costs 0.4 s."""
    c = PolygonClient(sim.base_url, TEST_KEY, budget, workers=4, read_timeout=READ_TIMEOUT, max_retries=8)
    yield c
    c.close()


def _exact(got: pl.DataFrame, kind: str, ticker: str) -> None:
    want = truth_frame(kind, ticker, LO, HI)
    assert want.height > 0 and got.height == want.height and got.equals(want)


def test_the_simulator_serves_a_proxys_html_page(sim: Simulator) -> None:
    sim.config.html_5xx_rate = 1.0
    r = requests.get(f"{sim.base_url}/v3/trades/AAOI", headers={"Authorization": "Bearer k"}, timeout=10)
    assert r.status_code in (502, 504) and r.headers["Content-Type"] == "text/html"
    assert r.text.startswith("<html>") and f"<title>{r.status_code} " in r.text and "nginx" in r.text
    assert "X-Smallcaps-Simulator" not in r.headers  # a proxy answered, not the API
    assert sim.counters()["faults"]["html_5xx"] == 1


def test_html_5xx_pages_are_retried_through_the_budget_and_counted(
    sim: Simulator, client: PolygonClient
) -> None:
    sim.config.html_5xx_rate = 0.2
    sim.config.error_5xx_rate = 0.05  # the API's own (JSON) 5xx count apart
    sim.config.page_cap = 300
    stats = FetchStats()
    _exact(client.fetch_range("trades", "BRK.B", LO, HI, stats), "trades", "BRK.B")
    faults = sim.counters()["faults"]
    assert stats.retries["5xx_html"] == faults["html_5xx"] > 0
    assert stats.retries["5xx"] == faults["5xx"] > 0
    assert stats.error_counts()["5xx_html"] == faults["html_5xx"]
    assert stats.as_dict()["retries_by_cause"]["5xx_html"] == faults["html_5xx"]
    assert stats.requests["trades"] == sim.counters()["total"]  # every retry took a grant
    assert client.source == "simulator"


def test_html_5xx_after_the_retries_names_the_status_and_the_html(
    sim: Simulator, budget: RequestBudget
) -> None:
    sim.config.html_5xx_rate = 1.0
    c = PolygonClient(sim.base_url, TEST_KEY, budget, max_retries=2)
    stats = FetchStats()
    with pytest.raises(PolygonError) as err:
        c.fetch_range("trades", "AAOI", LO, HI, stats)
    text = str(err.value)
    assert "HTTP 50" in text and "HTML page titled '50" in text and "not the API's JSON" in text
    assert "3 attempts" in text and TEST_KEY not in text and TEST_KEY not in repr(err.value)
    assert "Expecting value" not in text and "JSONDecodeError" not in repr(err.value)
    assert stats.error_counts() == {"5xx_html": 3}  # two retries, then the error
    assert stats.total_requests == sim.counters()["total"] == 3
    assert c.source == "polygon"  # declared by the caller: a proxy's page cannot change it


def test_hung_and_stalled_requests_are_retried_within_the_read_timeout(
    sim: Simulator, quick: PolygonClient
) -> None:
    """Some requests are read and never answered, some 200s stall mid-body: each ends at the read
    timeout, is retried (with a budget grant) and counted as ``read_timeout``; the frame is exact."""
    sim.config.hang_rate = 0.1
    sim.config.stall_rate = 0.1
    sim.config.page_cap = 400
    stats = FetchStats()
    t0 = time.monotonic()
    _exact(quick.fetch_range("quotes", "AAOI", LO, HI, stats), "quotes", "AAOI")
    elapsed = time.monotonic() - t0
    faults = sim.counters()["faults"]
    assert faults["hung"] > 0 and faults["stalled"] > 0, faults
    assert stats.retries["read_timeout"] == faults["hung"] + faults["stalled"]
    assert stats.error_counts() == {"read_timeout": faults["hung"] + faults["stalled"]}
    assert stats.requests["quotes"] == sim.counters()["total"]
    assert elapsed >= READ_TIMEOUT * (faults["hung"] + faults["stalled"])  # each waited out its timeout
    assert quick._bodies.used == 0


def test_a_server_that_never_answers_fails_within_the_bound(sim: Simulator, budget: RequestBudget) -> None:
    """Every request hangs: the fetch fails after 1 + 3 attempts of the 0.4 s read timeout (plus
    urllib3's backoff), with a clear error, instead of hanging the worker for ever."""
    sim.config.hang_rate = 1.0
    c = PolygonClient(sim.base_url, TEST_KEY, budget, read_timeout=READ_TIMEOUT, max_retries=3)
    stats = FetchStats()
    t0 = time.monotonic()
    with pytest.raises(PolygonError) as err:
        c.fetch_range("trades", "AAOI", LO, HI, stats)
    elapsed = time.monotonic() - t0
    backoff = sum(min(8.0, 0.2 * 2 ** (k - 1)) + 0.2 for k in range(2, 4))  # urllib3: none before the 1st
    assert 4 * READ_TIMEOUT <= elapsed < 4 * READ_TIMEOUT + backoff + 3.0, elapsed
    text = str(err.value)
    assert "no answer within the 0.4 s read timeout, 4 attempts" in text and TEST_KEY not in text
    assert stats.error_counts() == {"read_timeout": 4} == {"read_timeout": sim.counters()["faults"]["hung"]}
    assert stats.total_requests == 4


def test_a_body_that_always_stalls_fails_within_the_bound(
    sim: Simulator, budget: RequestBudget, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim.config.stall_rate = 1.0
    monkeypatch.setattr(polygon_client, "MAX_BODY_ATTEMPTS", 4)
    c = PolygonClient(sim.base_url, TEST_KEY, budget, read_timeout=READ_TIMEOUT)
    stats = FetchStats()
    t0 = time.monotonic()
    with pytest.raises(PolygonError, match=r"after 4 attempts \(the last: bodies that stalled longer than"):
        c.fetch_range("trades", "AAOI", LO, HI, stats)
    elapsed = time.monotonic() - t0
    assert 4 * READ_TIMEOUT <= elapsed < 4 * (READ_TIMEOUT + 0.5) + 3.0, elapsed  # + our 0.5 s backoff
    assert stats.retries["read_timeout"] == 4 == sim.counters()["faults"]["stalled"]
    assert c._bodies.used == 0


def test_hung_requests_through_the_engine_are_exact_and_counted(
    sim: Simulator, quick: PolygonClient, tmp_path: Path
) -> None:
    sim.config.hang_rate = 0.1
    sim.config.html_5xx_rate = 0.1
    sim.config.page_cap = 500
    windows = [Window(f"E{i}", LO + i * 5 * 60 * 10**9, LO + (i * 5 + 3) * 60 * 10**9) for i in range(3)]
    data = tmp_path / "d"
    (o,) = FetchEngine(quick, str(data), workers=4).run({"AAOI": windows})
    assert o.error is None and o.written == 3
    faults = sim.counters()["faults"]
    assert faults["hung"] > 0 and faults["html_5xx"] > 0, faults
    assert o.stats.error_counts() == {"read_timeout": faults["hung"], "5xx_html": faults["html_5xx"]}
    for w in windows:
        d = store.event_dir(data, "AAOI", w.event_id)
        want = shape.shape_trades(truth_frame("trades", "AAOI", w.start_ns, w.end_ns), w.start_ns, w.end_ns)
        assert pl.read_parquet(d / "trades.parquet").equals(want)


def test_a_hanging_handler_does_not_hold_up_the_simulators_stop() -> None:
    """A client that sent its request and keeps the connection open: stop() still returns."""
    sim = Simulator(SimConfig(hang_rate=1.0)).start()
    conn = socket.create_connection((sim.host, sim.port), timeout=5)
    conn.sendall(b"GET /v3/trades/AAOI HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n")
    deadline = time.monotonic() + 5
    while sim.counters()["faults"]["hung"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.counters()["faults"]["hung"] == 1
    t0 = time.monotonic()
    sim.stop()
    assert time.monotonic() - t0 < 3
    assert conn.recv(1024) == b""  # closed without an answer
    conn.close()
