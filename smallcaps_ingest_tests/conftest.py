"""Shared fixtures: a real simulator on loopback and helpers to compare against its ground truth."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from smallcaps_ingest.core import shape
from smallcaps_ingest.core.polygon.budget import RequestBudget
from smallcaps_ingest.core.polygon.client import PolygonClient
from smallcaps_ingest.simulator import SimConfig, Simulator, ground_truth

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures" / "polygon"
BIN = Path(sys.executable).parent
TEST_KEY = "sk_test_7f3c9a1e55d24b8f9e0a"  # a recognisable fake key, grepped for in leak tests


def ns(text: str) -> int:
    """'2024-03-05T14:30:00' (UTC) -> integer nanoseconds."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1_000_000_000


def truth_frame(kind: str, ticker: str, lo: int, hi: int, config: SimConfig | None = None) -> pl.DataFrame:
    """The simulator's ground truth for [lo, hi) as a raw frame, typed like the client's pages
    (``config``: a server's knobs that change the tape, such as duplicate sequence numbers)."""
    rows = ground_truth(kind, ticker, lo, hi, config)
    return pl.DataFrame(
        {c: [r.get(c) for r in rows] for c in shape.RAW_SCHEMAS[kind]},
        schema=shape.RAW_SCHEMAS[kind],
        strict=False,
    )


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        yield s


@pytest.fixture
def budget(tmp_path: Path) -> Iterator[RequestBudget]:
    b = RequestBudget(500, tmp_path / "budget.sqlite")
    yield b
    b.close()


@pytest.fixture
def client(sim: Simulator, budget: RequestBudget) -> Iterator[PolygonClient]:
    c = PolygonClient(sim.base_url, TEST_KEY, budget, source="simulator", workers=8, read_timeout=10)
    yield c
    c.close()


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: its own DAGSTER_HOME, data dir and budget file."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "SMALLCAPS_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(home),
        SMALLCAPS_DATA_DIR=str(tmp_path / "data"),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env
