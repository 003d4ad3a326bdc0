"""The fault knobs: 5xx, truncated bodies, resets, latency, and seeded draws that repeat."""

from __future__ import annotations

import time

import orjson
import pytest
import requests

from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.simulator.conftest import (
    DAY,
    get,
)


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


def test_latency_applies(fresh: Simulator) -> None:
    fresh.config.latency_ms = 120
    fresh.config.latency_jitter_ms = 20
    t = time.perf_counter()
    assert get(fresh, "trades", "AAOI", limit=1).status_code == 200
    assert time.perf_counter() - t >= 0.095


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
