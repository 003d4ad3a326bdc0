"""Tests for the bundled Polygon v3 simulator, over real HTTP on an ephemeral loopback port.

The simulator is the peer every other test trusts, so these pin its wire format, its paging
exactness against ``ground_truth`` and each fault knob.
"""

from __future__ import annotations

import base64
import calendar
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
import requests

from smallcaps_ingest import simulator as simmod
from smallcaps_ingest.simulator import SimConfig, Simulator, ground_truth, liquidity

FIXTURES = Path("/work/shared/fixtures/polygon")
REPO = Path(__file__).resolve().parents[2]
NS = 1_000_000_000
DAY = "2024-03-05"  # a Tuesday, EST (UTC-5): 09:30 ET == 14:30Z


def ns(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * NS


RTH_OPEN = ns(2024, 3, 5, 14, 30)
DAY_START = ns(2024, 3, 5, 5)  # 00:00 ET
DAY_END = ns(2024, 3, 6, 5)


@pytest.fixture(scope="module")
def sim() -> Any:
    with Simulator() as s:
        yield s


@pytest.fixture
def fresh() -> Any:
    """A private simulator for tests that mutate the config or read counters."""
    with Simulator() as s:
        yield s


def get(sim: Simulator, kind: str, ticker: str, key: str | None = "k", **params: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(f"{sim.base_url}/v3/{kind}/{ticker}", params=params, headers=headers, timeout=30)


def all_pages(sim: Simulator, kind: str, ticker: str, **params: Any) -> tuple[list[dict], list[str]]:
    s = requests.Session()
    s.headers["Authorization"] = "Bearer k"
    r = s.get(f"{sim.base_url}/v3/{kind}/{ticker}", params=params, timeout=30)
    rows, urls = [], []
    while True:
        assert r.status_code == 200, r.text
        body = r.json()
        rows.extend(body.get("results", []))
        if "next_url" not in body:
            return rows, urls
        urls.append(body["next_url"])
        r = s.get(body["next_url"], timeout=30)


def strip_id(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "request_id"}


# ---------------------------------------------------------------------------------------------
# Data and wire format
# ---------------------------------------------------------------------------------------------


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


def test_default_order_desc_and_asc(sim: Simulator) -> None:
    params = {"timestamp.gte": RTH_OPEN, "timestamp.lt": RTH_OPEN + 60 * NS, "limit": 50000}
    desc = get(sim, "quotes", "AAOI", **params).json()["results"]
    asc = get(sim, "quotes", "AAOI", order="asc", **params).json()["results"]
    assert len(desc) > 100
    assert asc == desc[::-1]
    keys = [(r["sip_timestamp"], r["sequence_number"]) for r in asc]
    assert keys == sorted(keys)


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_pagination_exact_with_page_cap(fresh: Simulator, order: str) -> None:
    fresh.config.page_cap = 137
    lo, hi = RTH_OPEN + 600 * NS, RTH_OPEN + 900 * NS
    rows, urls = all_pages(
        fresh, "trades", "AAOI", order=order, limit=1000, **{"timestamp.gte": lo, "timestamp.lt": hi}
    )
    truth = ground_truth("trades", "AAOI", lo, hi)
    assert len(truth) > 3 * 137
    assert rows == (truth if order == "asc" else truth[::-1])
    assert len(urls) == -(-len(truth) // 137) - 1
    for u in urls:
        assert "apiKey" not in u and "k" not in dict(parse_qsl(urlsplit(u).query))
        assert u.startswith(f"{fresh.base_url}/v3/trades/AAOI?cursor=")
    recs = [r for r in fresh.request_log() if r.cursor]
    assert recs and all(r.gte_ns == lo and r.lt_ns == hi and r.rows <= 137 for r in recs)


def test_next_url_never_carries_query_key(sim: Simulator) -> None:
    r = requests.get(
        f"{sim.base_url}/v3/trades/BRK.B",
        params={"apiKey": "SECRETKEY", "timestamp": DAY, "limit": 10},
        timeout=30,
    )
    body = r.json()
    assert "SECRETKEY" not in body["next_url"] and "apiKey" not in body["next_url"]
    cursor = dict(parse_qsl(urlsplit(body["next_url"]).query))["cursor"]
    assert b"SECRETKEY" not in base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    # Following it with the key in the query string (how the official client does it) works.
    r2 = requests.get(body["next_url"], params={"apiKey": "SECRETKEY"}, timeout=30)
    assert r2.status_code == 200 and len(r2.json()["results"]) == 10


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
        pages = _pages(fresh, "trades", "XELB", {"order": "asc", "timestamp.gte": lo, "timestamp.lt": hi,
                                                  "limit": limit})
        assert [r for p in pages for r in p] == truth, limit
        # every page holds one day; the day's last page ends with its last row
        assert all(len({r["sip_timestamp"] < DAY_END for r in p}) == 1 for p in pages), limit
        assert any(p[-1] == tue[-1] for p in pages) and len(pages) >= 2
    fresh.config.page_ends_at_day = False
    assert _pages(fresh, "trades", "XELB", {"order": "asc", "timestamp.gte": lo, "timestamp.lt": hi,
                                            "limit": 50_000}) == [truth]  # one page, no next_url


def _pages(sim: Simulator, kind: str, ticker: str, params: dict[str, Any]) -> list[list[dict]]:
    s = requests.Session()
    s.headers["Authorization"] = "Bearer k"
    body = s.get(f"{sim.base_url}/v3/{kind}/{ticker}", params=params, timeout=30).json()
    pages = [body.get("results", [])]
    while "next_url" in body:
        body = s.get(body["next_url"], timeout=30).json()
        pages.append(body.get("results", []))
    return pages


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
        pages = _pages(fresh, "trades", "AAOI", {"order": order, "timestamp.gte": lo, "timestamp.lt": hi,
                                                  "limit": limit})
        rows = [r for p in pages for r in p]
        assert (rows if order == "asc" else rows[::-1]) == dup, (order, limit)


def test_cursor_ignores_other_params(sim: Simulator) -> None:
    body = get(sim, "trades", "AAOI", limit=50, order="asc", timestamp=DAY).json()
    url = body["next_url"]
    plain = requests.get(url, headers={"Authorization": "Bearer k"}, timeout=30).json()
    noisy = requests.get(
        url,
        params={"limit": 1, "order": "desc", "timestamp.gte": DAY_END, "timestamp": "2020-01-02"},
        headers={"Authorization": "Bearer k"},
        timeout=30,
    ).json()
    assert strip_id(plain) == strip_id(noisy)
    assert len(plain["results"]) == 50
    assert plain["results"][0]["sip_timestamp"] >= body["results"][-1]["sip_timestamp"]


def test_empty_window_omits_results(sim: Simulator) -> None:
    r = get(sim, "trades", "AAOI", **{"timestamp.gte": DAY_START, "timestamp.lt": DAY_START + 3600 * NS})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "OK"
    assert "results" not in body and "next_url" not in body
    assert len(body["request_id"]) == 32 and int(body["request_id"], 16) >= 0


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


# ---------------------------------------------------------------------------------------------
# Timestamp parsing
# ---------------------------------------------------------------------------------------------


def test_timestamp_formats_agree(sim: Simulator) -> None:
    lo, hi = RTH_OPEN + 60 * NS, RTH_OPEN + 180 * NS
    variants = [
        {"timestamp.gte": lo, "timestamp.lt": hi},
        {"timestamp.gte": "2024-03-05T14:31:00Z", "timestamp.lt": "2024-03-05T14:33:00Z"},
        {"timestamp.gte": "2024-03-05T09:31:00-05:00", "timestamp.lt": "2024-03-05T09:33:00.000000000-05:00"},
        {"timestamp.gt": lo - 1, "timestamp.lte": hi - 1},
    ]
    results = [get(sim, "trades", "AAOI", limit=5000, order="asc", **v).json()["results"] for v in variants]
    assert results[0] == ground_truth("trades", "AAOI", lo, hi)
    assert all(r == results[0] for r in results)


def test_nanosecond_rfc3339_and_exact_match(sim: Simulator) -> None:
    row = ground_truth("trades", "AAOI", RTH_OPEN, RTH_OPEN + 60 * NS)[7]
    sip = row["sip_timestamp"]
    secs, frac = divmod(sip, NS)
    rfc = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(secs))}.{frac:09d}Z"
    for value in (rfc, str(sip)):
        exact = get(sim, "trades", "AAOI", timestamp=value).json()["results"]
        assert [r for r in exact if r["sequence_number"] == row["sequence_number"]] == [row]
        assert all(r["sip_timestamp"] == sip for r in exact)
        first = get(sim, "trades", "AAOI", order="asc", limit=1, **{"timestamp.gte": value}).json()
        assert first["results"][0]["sip_timestamp"] == sip
        after = get(sim, "trades", "AAOI", order="asc", limit=1, **{"timestamp.gt": value}).json()
        assert after["results"][0]["sip_timestamp"] > sip


def test_date_semantics(sim: Simulator) -> None:
    truth = ground_truth("trades", "XELB", DAY_START, DAY_END)
    assert truth and truth[0]["sip_timestamp"] >= DAY_START and truth[-1]["sip_timestamp"] < DAY_END
    for params in (
        {"timestamp": DAY},
        {"timestamp.gte": DAY, "timestamp.lte": DAY},
        {"timestamp.gte": DAY, "timestamp.lt": "2024-03-06"},
        {"timestamp.gt": "2024-03-04T23:59:59.999999999-05:00", "timestamp.lt": "2024-03-06"},
    ):
        assert get(sim, "trades", "XELB", order="asc", limit=50000, **params).json()["results"] == truth
    nothing = get(sim, "trades", "XELB", **{"timestamp.gte": DAY, "timestamp.lt": DAY}).json()
    assert "results" not in nothing


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"timestamp.gte": "yesterday"}, "timestamp.gte"),
        ({"timestamp": "2024-13-01"}, "timestamp"),
        ({"timestamp.lt": "2024-03-05T25:00:00Z"}, "timestamp.lt"),
        ({"limit": 50001}, "limit"),
        ({"limit": 0}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"order": "sideways"}, "order"),
        ({"sort": "price"}, "sort"),
        ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor"),
    ],
)
def test_bad_params_400(sim: Simulator, params: dict, needle: str) -> None:
    r = get(sim, "trades", "AAOI", **params)
    assert r.status_code == 400
    body = r.json()
    assert (
        body["status"] == "ERROR"
        and needle in body["error"]
        and str(list(params.values())[0]) in body["error"]
    )


# ---------------------------------------------------------------------------------------------
# Auth and routing
# ---------------------------------------------------------------------------------------------


def test_auth_errors(fresh: Simulator) -> None:
    r = get(fresh, "trades", "AAOI", key=None, timestamp=DAY)
    assert r.status_code == 401 and r.json()["error"] == "API Key was not provided"
    assert r.json()["status"] == "ERROR"
    fresh.config.keys = {"adv": "advanced", "dev": "developer", "free": "basic"}
    r = get(fresh, "trades", "AAOI", key="nope", timestamp=DAY)
    assert r.status_code == 401 and r.json()["error"] == "Unknown API Key"
    assert get(fresh, "trades", "AAOI", key="dev", timestamp=DAY, limit=3).status_code == 200
    r = get(fresh, "quotes", "AAOI", key="dev", timestamp=DAY)
    assert r.status_code == 403
    assert r.json()["status"] == "NOT_AUTHORIZED" and "not entitled" in r.json()["message"]
    assert get(fresh, "trades", "AAOI", key="free", timestamp=DAY).status_code == 403
    assert get(fresh, "quotes", "AAOI", key="adv", timestamp=DAY, limit=3).status_code == 200
    r = requests.get(f"{fresh.base_url}/v3/quotes/AAOI", params={"apiKey": "adv", "limit": 1}, timeout=30)
    assert r.status_code == 200
    assert fresh.request_log()[-1].had_api_key_in_query


def test_404_and_header_everywhere(fresh: Simulator) -> None:
    for path in ("/v2/aggs/ticker/AAOI", "/v3/trades/", "/v3/trades/A/B", "/"):
        r = requests.get(f"{fresh.base_url}{path}", headers={"Authorization": "Bearer k"}, timeout=30)
        assert r.status_code == 404, path
        assert r.json()["status"] == "NOT_FOUND" and r.json()["message"] == "Not found"
        assert r.headers["X-Smallcaps-Simulator"] == "1"
        assert r.headers["Content-Type"] == "application/json"
    r = get(fresh, "trades", "BRK.B", limit=2, timestamp=DAY)
    assert r.status_code == 200 and r.headers["X-Smallcaps-Simulator"] == "1"
    assert int(r.headers["Content-Length"]) == len(r.content)
    assert get(fresh, "trades", "AAOI", key=None).headers["X-Smallcaps-Simulator"] == "1"
    assert fresh.counters()["requests"]["other"]["404"] == 4
    r = requests.get(
        f"{fresh.base_url}/v3/trades/BRK%2EB",
        params={"timestamp": DAY, "limit": 1},
        headers={"Authorization": "Bearer k"},
        timeout=30,
    )
    assert (
        r.json()["results"][0] == get(fresh, "trades", "BRK.B", limit=1, timestamp=DAY).json()["results"][0]
    )


# ---------------------------------------------------------------------------------------------
# Faults, counters
# ---------------------------------------------------------------------------------------------


def test_rate_limit_429_with_and_without_retry_after(fresh: Simulator) -> None:
    fresh.config.rate_limit_rps = 5
    s = requests.Session()
    s.headers["Authorization"] = "Bearer k"
    url = f"{fresh.base_url}/v3/trades/AAOI"
    codes, retry = [], []
    for _ in range(15):
        r = s.get(url, params={"limit": 1, "timestamp": DAY}, timeout=30)
        codes.append(r.status_code)
        if r.status_code == 429:
            retry.append(r.headers.get("Retry-After"))
            assert "exceeded the maximum requests" in r.json()["error"]
            assert r.headers["X-Smallcaps-Simulator"] == "1"
    # 15 back-to-back requests take milliseconds: exactly the first 5 fit in the 1 s window.
    assert codes[:5] == [200] * 5 and codes.count(429) >= 5
    assert all(v is not None and int(v) >= 1 for v in retry)
    assert fresh.max_in_window(1.0, served_only=True) <= 5
    assert fresh.max_in_window(1.0) == 15
    assert fresh.counters()["requests"]["trades"] == {"200": codes.count(200), "429": codes.count(429)}
    fresh.config.rate_limit_retry_after = False
    r = s.get(url, params={"limit": 1}, timeout=30)
    assert r.status_code == 429 and "Retry-After" not in r.headers


def test_5xx_rate(fresh: Simulator) -> None:
    fresh.config.error_5xx_rate = 0.5
    s = requests.Session()
    statuses = [
        s.get(f"{fresh.base_url}/v3/trades/AAOI?limit=1&apiKey=k", timeout=30).status_code for _ in range(60)
    ]
    bad = [c for c in statuses if c >= 500]
    assert set(bad) <= {500, 502, 503} and len(set(bad)) >= 2
    assert 15 <= len(bad) <= 45 and statuses.count(200) == 60 - len(bad)
    r = next(
        r
        for r in (s.get(f"{fresh.base_url}/v3/trades/AAOI?limit=1&apiKey=k", timeout=30) for _ in range(50))
        if r.status_code >= 500
    )
    assert r.json() == {
        "status": "ERROR",
        "request_id": r.json()["request_id"],
        "error": "Internal server error",
    }


def test_truncate(fresh: Simulator) -> None:
    fresh.config.truncate_rate = 1.0
    outcomes = set()
    for _ in range(16):
        try:
            r = requests.get(
                f"{fresh.base_url}/v3/quotes/AAOI?limit=500&timestamp={DAY}&apiKey=k", timeout=30
            )
        except requests.exceptions.ChunkedEncodingError:
            outcomes.add("short-read")
            continue
        assert r.status_code == 200
        with pytest.raises(ValueError):
            orjson.loads(r.content)
        outcomes.add("invalid-json")
    assert outcomes == {"short-read", "invalid-json"}
    assert fresh.counters()["faults"]["truncated"] == 16
    fresh.config.truncate_rate = 0.0
    assert len(get(fresh, "quotes", "AAOI", limit=500, timestamp=DAY).json()["results"]) == 500


def test_reset(fresh: Simulator) -> None:
    fresh.config.reset_rate = 1.0
    for _ in range(3):
        with pytest.raises(requests.exceptions.ConnectionError):
            get(fresh, "trades", "AAOI", limit=1)
    assert [r.status for r in fresh.request_log()] == [0, 0, 0]
    assert fresh.counters()["requests"]["trades"] == {"0": 3}
    fresh.config.reset_rate = 0.0
    assert get(fresh, "trades", "AAOI", limit=1).status_code == 200


def test_counters_concurrency_and_windows(fresh: Simulator) -> None:
    fresh.config.latency_ms = 150
    s = requests.Session()
    s.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=8))
    s.headers["Authorization"] = "Bearer k"

    def one(i: int) -> int:
        return s.get(
            f"{fresh.base_url}/v3/trades/AAOI", params={"limit": 2, "timestamp": DAY}, timeout=30
        ).status_code

    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(one, range(16)))
    assert codes == [200] * 16
    c = fresh.counters()
    assert c["total"] == 16 and c["requests"]["trades"]["200"] == 16 and c["bytes"] > 0
    assert 4 <= c["max_concurrency"] <= 8
    log = fresh.request_log()
    assert [r.t for r in log] == sorted(r.t for r in log)
    assert all(r.rows == 2 and r.ticker == "AAOI" and r.endpoint == "trades" for r in log)
    assert fresh.max_in_window(10.0) == 16 and fresh.max_in_window(10.0, served_only=True) == 16
    assert 1 <= fresh.max_in_window(0.01) <= 8
    fresh.reset_counters()
    assert fresh.counters()["total"] == 0 and fresh.request_log() == [] and fresh.max_in_window() == 0


def test_latency_applies(fresh: Simulator) -> None:
    fresh.config.latency_ms = 120
    fresh.config.latency_jitter_ms = 20
    t = time.perf_counter()
    assert get(fresh, "trades", "AAOI", limit=1).status_code == 200
    assert time.perf_counter() - t >= 0.095


def test_refuses_non_loopback() -> None:
    with pytest.raises(ValueError):
        Simulator(host="0.0.0.0")
    with pytest.raises(SystemExit):
        simmod.main(["--host", "0.0.0.0", "--port", "0"])


def test_cli_subprocess_serves() -> None:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "smallcaps_ingest.simulator", "--port", str(port), "--page-cap", "7"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        timer = threading.Timer(20, proc.kill)
        timer.start()
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        timer.cancel()
        assert line == f"simulator listening on http://127.0.0.1:{port}"
        r = requests.get(
            f"http://127.0.0.1:{port}/v3/trades/AAOI", params={"apiKey": "k", "timestamp": DAY}, timeout=10
        )
        assert r.status_code == 200 and len(r.json()["results"]) == 7 and "next_url" in r.json()
        assert (
            "dagster"
            not in subprocess.run(
                [sys.executable, "-c", "import sys, smallcaps_ingest.simulator; print(sorted(sys.modules))"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_fault_rng_is_seeded() -> None:
    def statuses(seed: int) -> list[int]:
        with Simulator(SimConfig(error_5xx_rate=0.3, seed=seed)) as s:
            sess = requests.Session()
            return [
                sess.get(f"{s.base_url}/v3/trades/AAOI?limit=1&apiKey=k", timeout=30).status_code
                for _ in range(30)
            ]

    assert statuses(7) == statuses(7)
    assert statuses(7) != statuses(8)


def test_arrivals_are_counted_when_the_bytes_reach_the_server() -> None:
    """The log and the limiter use the kernel's receive stamp, not when a handler got to it."""
    from smallcaps_ingest.simulator.api import _fullest_window

    with Simulator(SimConfig()) as sim:
        host, port = sim.host, sim.port
        with sim._lock:  # hold every handler at the door for 0.3 s after the request arrived
            s = socket.create_connection((host, port))
            sent = time.monotonic()
            s.sendall(f"GET /v3/trades/AAOI?apiKey=k HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            time.sleep(0.3)
        s.settimeout(10)
        assert s.recv(12).startswith(b"HTTP/1.1")
        s.close()
        (rec,) = sim.request_log()
        assert abs(rec.t - sent) < 0.05  # arrival: when it was sent
        assert rec.handled - rec.t > 0.25  # handled after the lock was released
    # the limiter's window test with out-of-order arrivals: t = 1.0, limit window 1 s
    times = [0.2, 0.5, 0.9, 1.5, 1.6, 1.95]
    assert _fullest_window(times, 0, 3, 6, 1.0) == 3  # [0.2, 1.2), [0.9, 1.9) and [1.0, 2.0) hold 3
    assert _fullest_window(times, 0, 3, 5, 1.0) == 3  # without 1.95: [0.2, 1.2) still holds 3
    assert _fullest_window([0.5, 0.9, 1.2, 1.4], 0, 2, 4, 1.0) == 4  # [0.5, 1.5) holds all four
