"""The v3 API semantics: order, limit and paging exact against ``ground_truth``, cursors without
the key, timestamp formats and bounds, 400s, auth and entitlements, 404s, 429 rate limiting."""

from __future__ import annotations

import base64
import time
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from smallcaps_ingest.simulator import Simulator, ground_truth
from smallcaps_ingest.simulator.api import _fullest_window
from smallcaps_ingest_tests.simulator.conftest import (
    DAY,
    DAY_END,
    DAY_START,
    NS,
    RTH_OPEN,
    all_pages,
    get,
    strip_id,
)


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


def test_limiter_window_with_out_of_order_arrivals() -> None:
    """The limiter's window test with out-of-order arrivals: t = 1.0, limit window 1 s."""
    times = [0.2, 0.5, 0.9, 1.5, 1.6, 1.95]
    assert _fullest_window(times, 0, 3, 6, 1.0) == 3  # [0.2, 1.2), [0.9, 1.9) and [1.0, 2.0) hold 3
    assert _fullest_window(times, 0, 3, 5, 1.0) == 3  # without 1.95: [0.2, 1.2) still holds 3
    assert _fullest_window([0.5, 0.9, 1.2, 1.4], 0, 2, 4, 1.0) == 4  # [0.5, 1.5) holds all four
