"""The cost preview's vectorized estimate gives exactly the figures of walking the engine's planner
(``plan_groups``) event by event, on a manifest that mixes every case: lone blocks, overlapping
windows, windows minutes apart (ratio merges), a sparse name's days (allowance merges), closed
days, probes that are one block and probes that are not, components cut by the planner's horizon,
and a block longer than the horizon (planned by ``plan_groups`` itself)."""

from __future__ import annotations

import random
import shutil
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from smallcaps_ingest.core.plan import PLAN_HORIZON, DensityStore, Window, plan_groups
from smallcaps_ingest.ops import plan_estimate

S = 1_000_000_000
MIN = 60 * S


def _utc(day: int, hh: int, mm: int = 0) -> int:
    """ns of a UTC wall time on a 2024 March day (days up to 31; DST starts on the 10th)."""
    return int(datetime(2024, 3, 1, tzinfo=UTC).timestamp()) * S + ((day - 1) * 1440 + hh * 60 + mm) * MIN


def _session(t: int) -> str:
    hour = (t // (3600 * S) - 5) % 24  # ET, near enough for a label
    return "PM" if 4 <= hour < 9 else "RTH" if 9 <= hour < 16 else "AH" if 16 <= hour < 20 else "OFF"


def _manifest() -> list[tuple[str, str, int, int, str]]:
    rng = random.Random(11)
    rows: list[tuple[str, int, int]] = []
    for d in range(4, 16):  # ISO: one 10-minute window a day at 15:00 UTC (lone blocks, weekends OFF)
        rows.append(("ISO", _utc(d, 15), _utc(d, 15, 10)))
    rows.append(("ISO", _utc(6, 15), _utc(6, 15, 10)))  # the same window twice (ids break the tie)
    for d in (5, 6, 8):  # CLU: clusters of overlapping and nearby windows (its probe is not one block)
        for m in (0, 4, 9, 30, 33, 80, 200):
            rows.append(("CLU", _utc(d, 15, m), _utc(d, 15, m + 10)))
    for d in range(1, 29, 2):  # SPARSE (learned, low level): days apart, merged by the allowance
        rows.append(("SPARSE", _utc(d, 16), _utc(d, 16, 10)))
    for d in range(1, 12):  # DENSE (learned, ~85x the priors): 20 minutes apart, 3 pages each; may
        for m in range(0, 380, 20):  # share ranges (within the ratio) but saves nothing by it
            rows.append(("DENSE", _utc(d, 14, 30 + m), _utc(d, 14, 40 + m + 15 * (m % 120 == 0))))
    for k in range(220):  # LONG: every 47 min, PM to AH over days: components the horizon cuts
        t = _utc(4, 9) + k * 47 * MIN
        rows.append(("LONG", t, t + rng.choice([5, 10, 30]) * MIN))
    rows.append(("BLOCK", _utc(5, 15), _utc(5, 15, 10)))  # BLOCK: its probe, then a block longer
    for k in range(PLAN_HORIZON + 6):  # than the horizon, then more
        rows.append(("BLOCK", _utc(12, 15) + k * MIN, _utc(12, 15) + k * MIN + 10 * MIN))
    rows += [("BLOCK", _utc(13, 15), _utc(13, 15, 10)), ("BLOCK", _utc(13, 18), _utc(13, 18, 10))]
    for d in (8, 9, 10, 11):  # WEEKEND: Friday night, the weekend, early Monday (nothing to fetch)
        rows.append(("WEEKEND", _utc(d, 2), _utc(d, 2, 10)))
    rng.shuffle(rows)
    return [(f"{sym}_{i}", sym, a, b, _session(a)) for i, (sym, a, b) in enumerate(rows)]


@pytest.fixture
def density_file(tmp_path: Path) -> Path:
    store = DensityStore(tmp_path / "density.json")
    store.observe("SPARSE", "trades", _utc(1, 14, 30), _utc(1, 21), 300)
    store.observe("SPARSE", "quotes", _utc(1, 14, 30), _utc(1, 21), 2_000)
    store.observe("DENSE", "trades", _utc(1, 14, 30), _utc(1, 21), 4_000_000)
    store.save()
    return tmp_path / "density.json"


def _reference(manifest, path: Path, settings: plan_estimate.Settings) -> dict:
    """Every symbol walked through plan_groups event by event (the engine's sequence)."""
    density = DensityStore(path)
    total, sessions = plan_estimate.Tally(), {}
    by_symbol: dict[str, list] = {}
    for eid, sym, a, b, session in manifest:
        by_symbol.setdefault(sym, []).append((Window(eid, a, b), session))
    for sym, events in by_symbol.items():
        plan_estimate.walk_symbol(sym, events, density, settings, total, sessions)
    out = total.as_dict(settings.max_rps)
    out["sessions"] = {s: t.as_dict(settings.max_rps) for s, t in sessions.items()}
    return out


@pytest.mark.parametrize("max_rps", [90.0, 10.0])  # allowance 11,111 rows, then a whole page
def test_fast_estimate_equals_the_planner_walked_event_by_event(
    max_rps: float, density_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest()
    settings = plan_estimate.Settings(max_rps=max_rps)
    want = _reference(manifest, density_file, settings)

    walked: list[str] = []  # the symbols the fast path hands to plan_groups whole
    real = plan_estimate.walk_symbol
    monkeypatch.setattr(plan_estimate, "walk_symbol", lambda sym, *a: (walked.append(sym), real(sym, *a)))
    cut: list[str] = []  # heads that end inside a component the planner splits (inside a block)
    piece = plan_estimate._Walk.piece

    def spy(self, x: int, y: int, w: int | None = None) -> list:
        cut.append("block" if w else "component" if y < self.hi[y - 1] else "")
        return piece(self, x, y, w)

    monkeypatch.setattr(plan_estimate._Walk, "piece", spy)
    columns = ["event_id", "symbol", "start_ns", "end_ns", "session"]
    frame = pl.DataFrame(manifest, schema=columns, orient="row")
    shutil.copy(density_file, tmp_path / "scratch.json")
    got = plan_estimate.estimate_frame(frame, DensityStore(tmp_path / "scratch.json"), settings)

    assert walked == ["BLOCK", "LONG"]  # a block longer than a head; heads that are one group
    assert {"block", "component"} <= set(cut)  # and heads that end inside a split component
    assert {k: got[k] for k in want} == want  # requests by endpoint, rows, bytes, seconds, sessions
    assert got["symbols_to_fetch"] == 7 and got["symbols_without_density"] == 5
    assert set(got["sessions"]) == {"PM", "RTH", "AH", "OFF"}


def test_the_manifest_holds_what_the_fast_path_must_get_right(density_file: Path) -> None:
    """Not vacuous: the planner merges separated windows (ranges of several blocks), leaves others
    alone, and some symbol has more windows than one head holds."""
    by_symbol: dict[str, list[Window]] = {}
    for eid, sym, a, b, _ in _manifest():
        by_symbol.setdefault(sym, []).append(Window(eid, a, b))
    density = DensityStore(density_file)
    merged = alone = 0
    for sym, ws in by_symbol.items():
        for _, ranges, probe in plan_groups(sym, ws, density, overfetch_rows=11_111):
            for r in ranges:
                gapped = len(r.events) > 1 and any(
                    w.start_ns > max(v.end_ns for v in r.events if v.start_ns < w.start_ns)
                    for w in r.events[1:]
                    if any(v.start_ns < w.start_ns for v in r.events)
                )
                merged += gapped
                alone += len(r.events) == 1
                if probe:
                    density.observe(sym, r.kind, r.start_ns, r.end_ns, 10)
    assert merged > 10 and alone > 10
    assert len(by_symbol["LONG"]) > 3 * PLAN_HORIZON
