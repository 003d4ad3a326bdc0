"""The fetch engine over real HTTP against the bundled simulator: exact files, resume, merging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from smallcaps_ingest.core import engine as engine_module
from smallcaps_ingest.core import shape, store
from smallcaps_ingest.core.engine import FetchEngine, tune_malloc
from smallcaps_ingest.core.plan import DensityStore, Window
from smallcaps_ingest.core.polygon.client import PolygonClient
from smallcaps_ingest.simulator import Simulator
from smallcaps_ingest_tests.conftest import ns, truth_frame

MIN = 60_000_000_000


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
    engine = FetchEngine(client, str(tmp_path / "d"), workers=4, density=DensityStore(tmp_path / "dens.json"),
                         time_cost=False)  # pins the page planner; the time cost: test_plan
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
        engine = FetchEngine(  # the page planner (4 workers cannot keep 500 req/s busy: test_plan)
            client, str(data), workers=4, density=DensityStore(dens), overfetch_rows=allowance,
            time_cost=False,
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
    engine = FetchEngine(client, str(tmp_path / "d"), workers=4, overfetch_rows=50_000, time_cost=False)
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


def test_without_glibc_malloc_is_left_alone_and_the_engine_runs(
    client: PolygonClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where glibc is absent (macOS, Windows, musl) ``tune_malloc`` changes nothing and says so;
    the engine runs as anywhere else. Forced here by making the C library lookup fail."""

    def no_libc(name: str) -> object:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(engine_module, "_MALLOC_TUNED", False)
    monkeypatch.setattr(engine_module.ctypes, "CDLL", no_libc)
    assert tune_malloc() is False
    base = ns("2024-03-05T15:00:00")
    (o,) = FetchEngine(client, str(tmp_path / "d"), workers=2).run({"AAOI": [Window("a", base, base + MIN)]})
    assert o.error is None and o.written == 1
    assert engine_module._MALLOC_TUNED is False
