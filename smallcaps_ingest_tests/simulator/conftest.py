"""Shared by the simulator's tests: a simulator per module, a private one per test, HTTP helpers.

Every test talks to a real simulator over HTTP on an ephemeral loopback port.
"""

from __future__ import annotations

import calendar
from pathlib import Path
from typing import Any

import pytest
import requests

from smallcaps_ingest.simulator import Simulator

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


def pages_of(sim: Simulator, kind: str, ticker: str, params: dict[str, Any]) -> list[list[dict]]:
    s = requests.Session()
    s.headers["Authorization"] = "Bearer k"
    body = s.get(f"{sim.base_url}/v3/{kind}/{ticker}", params=params, timeout=30).json()
    pages = [body.get("results", [])]
    while "next_url" in body:
        body = s.get(body["next_url"], timeout=30).json()
        pages.append(body.get("results", []))
    return pages


def strip_id(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "request_id"}
