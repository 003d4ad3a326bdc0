"""Requests per event and over-fetch of the fetch engine, per manifest shape, counted at the simulator.

The simulator runs in-process with no latency and no rate limit (only request counts matter here).
For each manifest (isolated, clustered, in_play) the engine runs twice on fresh data dirs:

* cold: a new ``DensityStore`` (the planner only has its priors);
* warm: the ``DensityStore`` the cold pass saved (densities observed per symbol/endpoint/session).

Printed per pass: events, requests (every page counted by the simulator), requests/event, and the
over-fetch ratio = raw rows fetched / rows inside the event windows (the union per symbol-day),
overall and for the worst single request range, against the configured bound (4x). For reference:
the old per-event approach (one trades + one quotes range per event, paged), and the floor (one
range per symbol-day and endpoint that would hold exactly the windows' rows, paged at 50,000).
A second table shows what the planner alone predicts (``plan_symbol``), cold and warm.

    python benchmarks/requests_per_event.py                 # ~1-2 min
    python benchmarks/requests_per_event.py --scale 0.3     # quick
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import _bootstrap  # noqa: F401
from _common import Truth, load_average, run_ours, table
from manifests import Event, describe, make, to_work

from smallcaps_ingest.plan import PAGE_ROWS, DensityStore, group_by_day, plan_symbol
from smallcaps_ingest.simulator import SimConfig, Simulator, liquidity

TARGETS = {"isolated": 2.0, "clustered": 1.15, "in_play": 1.3}
SIZES = {"isolated": 300, "clustered": 300, "in_play": 160}
BOUND = 4.0


def predict(events: list[Event], density: DensityStore) -> tuple[int, int]:
    """(ranges, expected pages) the planner makes for the manifest with this density store."""
    ranges = pages = 0
    for symbol, windows in to_work(events).items():
        for day_windows in group_by_day(windows).values():
            for r in plan_symbol(symbol, day_windows, density, BOUND):
                ranges += 1
                expected = density.expected_rows(symbol, r.kind, r.start_ns, r.end_ns)
                pages += max(1, math.ceil(expected / PAGE_ROWS))
    return ranges, pages


def analyse(sim: Simulator, truth: Truth) -> dict[str, float]:
    """Requests, ranges and over-fetch from the simulator's request log of one pass."""
    log = sim.request_log()
    raw: dict[tuple[str, str, int, int], int] = defaultdict(int)
    for r in log:
        raw[(r.endpoint, r.ticker or "", r.gte_ns or 0, r.lt_ns or 0)] += r.rows
    worst = 0.0
    over_bound = 0
    for (kind, sym, a, b), n in raw.items():
        need = truth.count(kind, sym, a, b)
        ratio = n / need if need else (math.inf if n else 1.0)
        worst = max(worst, ratio)
        over_bound += ratio > BOUND + 1e-9
    inside = truth.inside_total("trades") + truth.inside_total("quotes")
    fetched = sum(raw.values())
    return {"requests": len(log), "ranges": len(raw), "non200": sum(r.status != 200 for r in log),
            "fetched": fetched, "inside": inside, "overfetch": fetched / inside if inside else math.nan,
            "worst": worst, "over_bound": over_bound}


def references(events: list[Event], truth: Truth) -> tuple[int, int]:
    """(requests of the per-event approach, floor) from ground-truth row counts."""
    per_event = sum(max(1, math.ceil(truth.count(k, e.symbol, e.start_ns, e.end_ns) / PAGE_ROWS))
                    for e in events for k in ("trades", "quotes"))
    floor = sum(max(1, math.ceil(len(truth.sips(k, sym, day)) / PAGE_ROWS))
                for sym, day in truth.unions for k in ("trades", "quotes"))
    return per_event, floor


def liquidity_class(symbol: str) -> str:
    x = liquidity(symbol)
    return "sparse <0.3" if x < 0.3 else "mid 0.3-2" if x < 2 else "dense >=2"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifests", default="isolated,clustered,in_play")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the manifest sizes (default sizes: "
                   + ", ".join(f"{k} {v}" for k, v in SIZES.items()) + " events)")
    p.add_argument("--workers", type=int, default=12)
    a = p.parse_args()
    kinds = [k.strip() for k in a.manifests.split(",") if k.strip()]

    main_rows, plan_rows, liq_rows = [], [], []
    t_start = time.monotonic()
    print(f"load average at start: {load_average()}")
    with Simulator(SimConfig()) as sim, tempfile.TemporaryDirectory(prefix="bench-rpe-") as tmp:
        for kind in kinds:
            events = make(kind, max(3, round(SIZES[kind] * a.scale)))
            n = len(events)
            print(f"[{kind}] {describe(events)}", flush=True)
            truth = Truth(events)
            base = Path(tmp) / kind
            density_path = base / "density.json"
            cold_plan = predict(events, DensityStore(None))
            results = {}
            for phase in ("cold", "warm"):
                plan = cold_plan if phase == "cold" else predict(events, DensityStore(density_path))
                sim.reset_counters()
                run = run_ours(sim.base_url, events, 10_000, base / phase, density=DensityStore(density_path),
                               workers=a.workers)
                res = analyse(sim, truth)
                res["written"] = run.events
                res["rows_raw_engine"] = run.rows_raw
                res["plan"] = plan
                results[phase] = res
                if phase == "cold":
                    by: dict[str, list[int]] = defaultdict(lambda: [0, 0])
                    for r in sim.request_log():
                        by[liquidity_class(r.ticker or "")][1] += 1
                    for e in events:
                        by[liquidity_class(e.symbol)][0] += 1
                    for cls in ("sparse <0.3", "mid 0.3-2", "dense >=2"):
                        if by[cls][0]:
                            liq_rows.append((kind, cls, by[cls][0], by[cls][1], by[cls][1] / by[cls][0]))
                if run.events != n or res["non200"] or run.rows_raw != res["fetched"]:
                    print(f"  ! {phase}: written {run.events}/{n}, non-200 {res['non200']}, "
                          f"engine rows_raw {run.rows_raw} vs server rows {res['fetched']}")
            per_event, floor = references(events, truth)
            for phase, res in results.items():
                rpe = res["requests"] / n
                main_rows.append((
                    f"{kind} ({phase})", n, res["requests"], rpe, TARGETS[kind],
                    "OK" if rpe <= TARGETS[kind] + 1e-9 else "ABOVE", per_event / n, floor / n,
                    res["overfetch"], res["worst"], res["over_bound"], BOUND,
                ))
                ranges, pages = res["plan"]
                plan_rows.append((f"{kind} ({phase} store)", n, ranges, pages, pages / n, res["ranges"],
                                  res["requests"]))

    print()
    print(table(
        ["manifest (pass)", "events", "requests", "req/event", "target", "", "per-event", "floor",
         "overfetch", "worst range", "ranges >4x", "bound"],
        main_rows,
        title="Requests per event (pages counted at the simulator), over-fetch (raw rows / rows in windows)",
    ))
    print()
    print(table(
        ["manifest (planner input)", "events", "plan ranges", "plan pages", "plan req/event", "ranges made",
         "requests made"],
        plan_rows,
        title="What plan_symbol predicts (pages = ceil(expected rows / 50,000) per range) vs what was made",
    ))
    print()
    print(table(["manifest", "liquidity", "events", "requests", "req/event"], liq_rows,
                title="Cold pass by liquidity class"))
    print(f"\n(per-event = one trades + one quotes range per event, paged; floor = one range per symbol-day "
          f"and endpoint holding exactly the windows' rows; total {time.monotonic() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
