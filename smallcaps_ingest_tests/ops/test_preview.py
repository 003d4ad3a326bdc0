"""``smallcaps-ingest plan``: the estimate's arithmetic on a hand-made tree (exact request counts,
rows and bytes from the densities by hand), through the CLI, without any request or write."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from smallcaps_ingest.core.density import PRIOR_DENSITY, PRIOR_LEVEL_ROWS, PRIOR_SECONDS
from smallcaps_ingest.ops import preview

CLI = Path(sys.executable).with_name("smallcaps-ingest")
# Tuesday 2024-03-05 and Wednesday 2024-03-06 are EST (UTC-5): 10:00 ET is 15:00 UTC.
EVENTS = [  # symbol, event id, ET start (day, hh:mm), session; every window is 10 minutes
    ("AAA", "AAA_E1", ("05", "10:00"), "RTH"),
    ("AAA", "AAA_E2", ("05", "10:05"), "RTH"),  # overlaps E1: one block 10:00-10:15
    ("AAA", "AAA_E3", ("05", "14:00"), "RTH"),
    ("AAA", "AAA_E4", ("06", "10:00"), "RTH"),
    ("BBB", "BBB_DONE", ("05", "10:00"), "RTH"),  # complete on disk: not fetched
    ("BBB", "BBB_PART", ("05", "11:00"), "RTH"),  # trades only on disk: fetched again
    ("CCC", "CCC_PM", ("05", "08:00"), "PM"),
]
BBB_SECONDS = 3600.0  # density.json: BBB's trades seen for an hour of RTH at 100 ticks/s


def _utc(day: str, hhmm: str) -> datetime:
    h, m = map(int, hhmm.split(":"))
    return datetime(2024, 3, int(day), h + 5, m, tzinfo=UTC)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    rows = []
    for sym, eid, (day, hhmm), session in EVENTS:
        start = _utc(day, hhmm)
        rows.append((eid, sym, start, start + (_utc("05", "10:10") - _utc("05", "10:00")), session))
    pl.DataFrame(
        rows, schema=["event_id", "symbol", "ts_start", "ts_end", "session"], orient="row"
    ).with_columns(pl.col("ts_start", "ts_end").dt.cast_time_unit("ns")).write_parquet(
        tmp_path / "manifest.parquet"
    )
    root = tmp_path / "event_windows" / "symbol=BBB"
    for eid, files in (("BBB_DONE", ("trades", "quotes")), ("BBB_PART", ("trades",))):
        (root / f"event={eid}").mkdir(parents=True)
        for f in files:
            (root / f"event={eid}" / f"{f}.parquet").write_bytes(b"x")
    (tmp_path / "_state").mkdir()
    density = {"BBB": {"trades": {"RTH": [100.0 * BBB_SECONDS, BBB_SECONDS]}}}
    (tmp_path / "_state" / "density.json").write_text(json.dumps(density))
    return tmp_path


def _plan(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POLYGON_MAX_RPS": "90", "POLYGON_API_KEY": "plan-must-not-need-this"}
    for k in ("SMALLCAPS_OVERFETCH_ROWS", "SMALLCAPS_MAX_OVERFETCH", "SMALLCAPS_QUOTES_HZ"):
        env.pop(k, None)
    return subprocess.run(
        [str(CLI), "plan", "--data-dir", str(data_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _quote_rows(raw: float) -> float:  # 600 one-second buckets, from the window's first quote on
    return 600 - 600 / raw


def test_plan_arithmetic_on_a_hand_made_tree(tree: Path) -> None:
    before = _listing(tree)
    res = json.loads(_plan(tree, "--json").stdout)
    assert _listing(tree) == before  # nothing written, not even a cache

    # AAA (no density: priors, RTH trades 2/s, quotes 10/s). Probe: the block 10:00-10:15, one
    # trades and one quotes request. Then at level 1: 14:00 and the next day's 10:00 cannot share
    # a range: the gap holds 30,840 trades rows (RTH 4,800 s x 2, CLOSE 1,800 s x 4, AH 4 h x 0.2,
    # PM 5.5 h x 0.2, OPEN 1,800 s x 4) > max(3 x 2,400, the 11,111-row allowance at 90 req/s).
    aaa = {"trades": 3, "quotes": 3}
    # BBB: known, trades level L = (360,000 + 10) / (7,200 + 10); RTH trades density and quotes
    # density (at the trades' level, nothing seen) for its one 600 s window.
    level = (100.0 * BBB_SECONDS + PRIOR_LEVEL_ROWS) / (
        PRIOR_DENSITY["trades"]["RTH"] * BBB_SECONDS + PRIOR_LEVEL_ROWS
    )
    t_dens = (100.0 * BBB_SECONDS + PRIOR_DENSITY["trades"]["RTH"] * level * PRIOR_SECONDS) / (
        BBB_SECONDS + PRIOR_SECONDS
    )
    q_dens = PRIOR_DENSITY["quotes"]["RTH"] * level
    bbb = {"trades": math.ceil(600 * t_dens / 50_000), "quotes": math.ceil(600 * q_dens / 50_000)}
    assert bbb == {"trades": 2, "quotes": 6}
    ccc = {"trades": 1, "quotes": 1}  # PM, priors 0.2 and 1 per second: 120 and 600 rows
    assert res["requests"] == {"trades": 6, "quotes": 10, "total": 16}
    assert res["seconds"] == round(16 / 90, 1)
    assert res["events_to_fetch"] == 6 and res["events_complete"] == 1
    assert res["symbols_without_density"] == 2 and res["symbols_to_fetch"] == 3

    trades_rows = 4 * 600 * 2.0 + 600 * t_dens + 600 * 0.2
    quotes_rows = 4 * _quote_rows(6000) + _quote_rows(600 * q_dens) + _quote_rows(600)
    assert res["rows"]["trades"] == round(trades_rows)
    assert res["rows"]["quotes"] == round(quotes_rows)
    fixed = 6 * (preview.FILE_BYTES["trades"] + preview.FILE_BYTES["quotes"])
    size = fixed + preview.ROW_BYTES["trades"] * trades_rows + preview.ROW_BYTES["quotes"] * quotes_rows
    assert res["bytes"] == round(size)

    rth, pm = res["sessions"]["RTH"], res["sessions"]["PM"]
    assert list(res["sessions"]) == ["PM", "RTH"]
    assert rth["events_to_fetch"] == 5 and pm["events_to_fetch"] == 1
    assert rth["requests"]["total"] == sum(aaa.values()) + sum(bbb.values())
    assert pm["requests"] == {**ccc, "total": 2}
    assert pm["seconds"] == round(2 / 90, 1) and rth["bytes"] + pm["bytes"] in (
        res["bytes"],
        res["bytes"] + 1,
    )


def test_plan_at_another_rate_replans_with_its_allowance(tree: Path) -> None:
    """At 10 req/s the allowance is a whole page (50,000 rows): AAA's 14:00 and next-day trades
    share one range (33,240 rows, one page); their quotes (154,200 gap rows) still do not."""
    proc = _plan(tree, "--json", "--max-rps", "10")
    res = json.loads(proc.stdout)
    assert res["max_rps"] == 10.0
    assert res["requests"] == {"trades": 5, "quotes": 10, "total": 15}
    assert res["seconds"] == 1.5
    assert res["at_budget"] == {"max_rps": 90.0, "requests": {"trades": 6, "quotes": 10, "total": 16},
                                "seconds": 0.2}  # fmt: skip


def test_plan_text_and_errors(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    proc = _plan(tree)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "events to fetch   6 over 3 symbols (1 complete on disk, skipped)" in out
    assert "requests          16  (trades 6, quotes 10)" in out
    assert "at 90 req/s" in out
    assert "2 symbols have no learned density yet" in out and "priors" in out
    assert "plan-must-not-need-this" not in out + proc.stderr

    empty = tmp_path_factory.mktemp("nomanifest")
    proc = _plan(empty)
    assert proc.returncode == 1
    assert (
        f"no manifest at {empty / 'manifest.parquet'}" in proc.stderr
        and "materialize the manifest" in proc.stderr
    )
