"""Requests per event and over-fetch of the fetch engine, per manifest shape, counted at the simulator,
against the floor: the fewest requests any planner could make knowing the data exactly.

The simulator runs in-process with no latency and no rate limit (only request counts matter here).
For each manifest (isolated, clustered, clustered_in_play, in_play) the engine runs twice on fresh
data dirs:

* cold: a new ``DensityStore`` (the planner only has its priors);
* warm: the ``DensityStore`` the cold pass saved (densities observed per symbol/endpoint/session).

Printed per pass: events, requests (every page counted by the simulator), requests/event, and the
over-fetch ratio = raw rows fetched / rows inside the event windows (the union per symbol-day),
overall and for the worst single request range, against the configured bound (4x).

**Floor** (from the simulator's ground truth): per symbol-day and endpoint, the best partition of
the day's windows into request ranges, each range costing ceil(rows / 50,000) pages (at least 1)
and holding at most 4x the rows its windows need (ranges never cross a symbol-day; a range that
spans windows covers the ones in between, so contiguous runs of windows are enough). The minimum is
found exactly (dynamic programme over the day's windows, ``plan.partition`` with true row counts).
No planner that respects the bound can make fewer requests; one that exceeds the bound on some
range (``ranges >4x``) can. "floor, any over-fetch" drops the bound, to show what the bound costs.

A second table costs the planner's ranges on ground truth without HTTP: with the cold store, the
warm store, and a proposed engine order for cold symbols (fetch the day's trades first, observe
them, then plan its quotes with the symbol's level learned from its trades), simulated.

    python benchmarks/requests_per_event.py                 # ~2-3 min
    python benchmarks/requests_per_event.py --scale 0.3     # quick
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import _bootstrap  # noqa: F401
from _common import Truth, load_average, run_ours, table
from manifests import Event, describe, make, to_work

from smallcaps_ingest import simulator as simmod
from smallcaps_ingest.plan import (
    KINDS,
    PAGE_ROWS,
    DensityStore,
    RequestRange,
    Window,
    group_by_day,
    partition,
    plan_kind,
    plan_symbol,
)
from smallcaps_ingest.simulator import SimConfig, Simulator, liquidity

TARGETS = {"isolated": 2.0, "clustered": 1.15, "clustered_in_play": 1.15, "in_play": 1.3}
SIZES = {"isolated": 300, "clustered": 300, "clustered_in_play": 300, "in_play": 160}
BOUND = 4.0
CLASSES = ("sparse <0.3", "mid 0.3-2", "dense >=2")


def pages(rows: float) -> int:
    return max(1, math.ceil(rows / PAGE_ROWS))


def liquidity_class(symbol: str) -> str:
    x = liquidity(symbol)
    return CLASSES[0] if x < 0.3 else CLASSES[1] if x < 2 else CLASSES[2]


# ----------------------------------------------------------------------------------------------
# Ground truth: tick counts of any range, and the floor
# ----------------------------------------------------------------------------------------------
class TickCounter:
    """Ground-truth tick count of any [start, end) of a ticker, without generating its rows.

    The simulator seeds one RNG per (kind, ticker, minute) and draws the minute's tick count
    first, then its sip timestamps: so a whole minute costs one Poisson draw and only the minutes
    cut by a bound need their timestamps. This reuses the simulator's own (private) generation
    steps; ``check`` compares it with ``simulator.ground_truth`` on every event window of a run.
    """

    def __init__(self) -> None:
        self._minutes: dict[tuple[str, str, int], tuple[int, list[int] | None]] = {}

    def _minute(
        self, kind: str, ticker: str, m: int, minute_of_day: int, stamps: bool
    ) -> tuple[int, list[int]]:
        key = (kind, ticker, m)
        hit = self._minutes.get(key)
        if hit is None or (stamps and hit[1] is None):
            rate = simmod.BASE_RATE[kind] * simmod._ticker_params(ticker).liq * simmod._FACTOR[minute_of_day]
            n, sips = 0, []
            if rate > 0:
                rng = simmod.random.Random(simmod._minute_seed(kind, ticker, m))
                n = simmod._poisson(rng, rate * 60.0)
                if stamps:
                    r = rng.random
                    sips = sorted(m + int(r() * 59_999_999_999) for _ in range(n))
            hit = (n, sips if stamps or n == 0 else None)
            self._minutes[key] = hit
        return hit[0], hit[1] or []

    def count(self, kind: str, ticker: str, start_ns: int, end_ns: int) -> int:
        if liquidity(ticker) <= 0:
            return 0
        total = 0
        for m, minute_of_day, _ in simmod._iter_minutes(start_ns, end_ns, False):
            cut = start_ns > m or end_ns < m + simmod.MINUTE_NS
            n, sips = self._minute(kind, ticker, m, minute_of_day, cut)
            total += n if not cut else bisect_left(sips, end_ns) - bisect_left(sips, start_ns)
        return total

    def check(self, truth: Truth) -> None:
        for (symbol, _day), blocks in truth.unions.items():
            for kind in KINDS:
                for a, b in blocks:
                    got, want = self.count(kind, symbol, a, b), truth.count(kind, symbol, a, b)
                    if got != want:
                        raise SystemExit(
                            f"TickCounter disagrees with ground_truth: {kind} {symbol} "
                            f"[{a}, {b}): {got} vs {want} (did the simulator's generator change?)"
                        )


def floor_pages(
    counter: TickCounter, kind: str, symbol: str, blocks: Sequence[tuple[int, int]], bound: float = BOUND
) -> int:
    """Fewest pages for one symbol-day and endpoint (blocks = the union of its windows, in order)."""
    need = [counter.count(kind, symbol, a, b) for a, b in blocks]
    span = {}

    def rows(i: int, j: int) -> float:
        if (i, j) not in span:
            span[i, j] = counter.count(kind, symbol, blocks[i][0], blocks[j - 1][1])
        return span[i, j]

    return sum(pages(rows(i, j)) for i, j in partition(need, rows, bound, pages))


def cost_on_truth(counter: TickCounter, symbol: str, ranges: Sequence[RequestRange]) -> tuple[int, int]:
    """(pages, ranges above the bound) of planned ranges, on ground truth."""
    total = over = 0
    for r in ranges:
        raw = counter.count(r.kind, symbol, r.start_ns, r.end_ns)
        need = sum(counter.count(r.kind, symbol, w.start_ns, w.end_ns) for w in _union(r.events))
        total += pages(raw)
        over += raw > BOUND * need
    return total, over


def _union(windows: Sequence[Window]) -> list[Window]:
    out: list[Window] = []
    for w in sorted(windows, key=lambda w: w.start_ns):
        if out and w.start_ns <= out[-1].end_ns:
            out[-1] = Window(out[-1].event_id, out[-1].start_ns, max(out[-1].end_ns, w.end_ns))
        else:
            out.append(w)
    return out


# ----------------------------------------------------------------------------------------------
# The planner alone, on ground truth
# ----------------------------------------------------------------------------------------------
def planner_only(
    events: list[Event], counter: TickCounter, density_path: Path | None, mode: str
) -> dict[str, float]:
    """Ranges, predicted pages, true pages and ranges >4x of ``plan_symbol`` over the manifest.

    mode "cold": every symbol-day on a new store (what the engine's cold pass does while nothing
    it fetched has been observed yet); "warm": the store at ``density_path``; "trades-first": a
    new store per symbol-day, trades planned and observed (true rows) before quotes are planned.
    """
    ranges = predicted = true_pages = over = 0
    warm = DensityStore(density_path) if mode == "warm" else None
    for symbol, windows in to_work(events).items():
        for day in group_by_day(windows).values():
            store = warm or DensityStore(None)
            if mode == "trades-first":
                planned = plan_kind(symbol, "trades", day, store, BOUND)
                for r in planned:
                    store.observe(
                        symbol,
                        r.kind,
                        r.start_ns,
                        r.end_ns,
                        counter.count(r.kind, symbol, r.start_ns, r.end_ns),
                    )
                planned = planned + plan_kind(symbol, "quotes", day, store, BOUND)
            else:
                planned = plan_symbol(symbol, day, store, BOUND)
            ranges += len(planned)
            predicted += sum(
                pages(store.expected_rows(symbol, r.kind, r.start_ns, r.end_ns)) for r in planned
            )
            p, o = cost_on_truth(counter, symbol, planned)
            true_pages += p
            over += o
    return {"ranges": ranges, "predicted": predicted, "pages": true_pages, "over": over}


# ----------------------------------------------------------------------------------------------
# The engine, counted at the simulator
# ----------------------------------------------------------------------------------------------
def analyse(sim: Simulator, truth: Truth) -> dict[str, float]:
    """Requests, ranges and over-fetch from the simulator's request log of one pass."""
    log = sim.request_log()
    raw: dict[tuple[str, str, int, int], int] = defaultdict(int)
    by_class: dict[str, int] = defaultdict(int)
    for r in log:
        raw[(r.endpoint, r.ticker or "", r.gte_ns or 0, r.lt_ns or 0)] += r.rows
        by_class[liquidity_class(r.ticker or "")] += 1
    worst = 0.0
    over_bound = 0
    for (kind, sym, a, b), n in raw.items():
        need = truth.count(kind, sym, a, b)
        ratio = n / need if need else (math.inf if n else 1.0)
        worst = max(worst, ratio)
        over_bound += ratio > BOUND + 1e-9
    inside = truth.inside_total("trades") + truth.inside_total("quotes")
    fetched = sum(raw.values())
    return {
        "requests": len(log),
        "ranges": len(raw),
        "non200": sum(r.status != 200 for r in log),
        "fetched": fetched,
        "inside": inside,
        "overfetch": fetched / inside if inside else math.nan,
        "worst": worst,
        "over_bound": over_bound,
        "by_class": by_class,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifests", default="isolated,clustered,clustered_in_play,in_play")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the manifest sizes (default sizes: "
        + ", ".join(f"{k} {v}" for k, v in SIZES.items())
        + " events)",
    )
    p.add_argument("--workers", type=int, default=12)
    a = p.parse_args()
    kinds = [k.strip() for k in a.manifests.split(",") if k.strip()]

    main_rows, plan_rows, liq_rows, reach_rows = [], [], [], []
    t_start = time.monotonic()
    print(f"load average at start: {load_average()}")
    with Simulator(SimConfig()) as sim, tempfile.TemporaryDirectory(prefix="bench-rpe-") as tmp:
        for kind in kinds:
            events = make(kind, max(3, round(SIZES[kind] * a.scale)))
            n = len(events)
            print(f"[{kind}] {describe(events)}", flush=True)
            truth = Truth(events)
            counter = TickCounter()
            counter.check(truth)

            # the floor, per symbol-day and endpoint, overall and by liquidity class
            floor = floor_free = 0
            per_event = 0
            cls_events: dict[str, int] = defaultdict(int)
            cls_floor: dict[str, int] = defaultdict(int)
            for e in events:
                cls_events[liquidity_class(e.symbol)] += 1
                per_event += sum(pages(counter.count(k, e.symbol, e.start_ns, e.end_ns)) for k in KINDS)
            for (sym, _day), blocks in truth.unions.items():
                f = sum(floor_pages(counter, k, sym, blocks) for k in KINDS)
                floor += f
                cls_floor[liquidity_class(sym)] += f
                floor_free += sum(floor_pages(counter, k, sym, blocks, math.inf) for k in KINDS)

            base = Path(tmp) / kind
            density_path = base / "density.json"
            results = {}
            for phase in ("cold", "warm"):
                sim.reset_counters()
                run = run_ours(
                    sim.base_url,
                    events,
                    10_000,
                    base / phase,
                    density=DensityStore(density_path),
                    workers=a.workers,
                )
                res = analyse(sim, truth)
                results[phase] = res
                if run.events != n or res["non200"] or run.rows_raw != res["fetched"]:
                    print(
                        f"  ! {phase}: written {run.events}/{n}, non-200 {res['non200']}, "
                        f"engine rows_raw {run.rows_raw} vs server rows {res['fetched']}"
                    )

            for phase, res in results.items():
                rpe = res["requests"] / n
                main_rows.append(
                    (
                        f"{kind} ({phase})",
                        n,
                        res["requests"],
                        rpe,
                        floor / n,
                        rpe - floor / n,
                        TARGETS[kind],
                        "OK" if rpe <= TARGETS[kind] + 1e-9 else "ABOVE",
                        per_event / n,
                        res["overfetch"],
                        res["worst"],
                        res["over_bound"],
                    )
                )
            for mode in ("cold", "warm", "trades-first"):
                po = planner_only(events, counter, density_path, mode)
                made = results[mode]["requests"] if mode in results else math.nan
                label = (
                    f"{kind} ({mode} store)" if mode != "trades-first" else f"{kind} (cold, trades first)*"
                )
                plan_rows.append(
                    (
                        label,
                        n,
                        po["ranges"],
                        po["predicted"],
                        po["pages"],
                        po["pages"] / n,
                        floor / n,
                        po["over"],
                        made,
                    )
                )
            for cls in CLASSES:
                if cls_events[cls]:
                    ne = cls_events[cls]
                    liq_rows.append(
                        (
                            kind,
                            cls,
                            ne,
                            cls_floor[cls] / ne,
                            results["cold"]["by_class"][cls] / ne,
                            results["warm"]["by_class"][cls] / ne,
                        )
                    )
            best = min(results["cold"]["requests"], results["warm"]["requests"]) / n
            verdict = (
                "reachable"
                if floor / n <= TARGETS[kind] + 1e-9
                else "NOT reachable within the bound (floor > target)"
            )
            reach_rows.append(
                (
                    kind,
                    n,
                    TARGETS[kind],
                    floor / n,
                    floor_free / n,
                    results["cold"]["requests"] / n,
                    results["warm"]["requests"] / n,
                    "met" if best <= TARGETS[kind] + 1e-9 else "not met",
                    verdict,
                )
            )

    print()
    print(
        table(
            [
                "manifest (pass)",
                "events",
                "requests",
                "req/event",
                "floor",
                "above floor",
                "target",
                "",
                "per-event",
                "overfetch",
                "worst range",
                "ranges >4x",
            ],
            main_rows,
            title=f"Requests per event (pages counted at the simulator) vs the floor; "
            f"over-fetch = raw rows / rows in windows (bound {BOUND:g}x per range)",
        )
    )
    print()
    print(
        table(
            [
                "manifest (planner input)",
                "events",
                "ranges",
                "pages predicted",
                "pages true",
                "req/event",
                "floor",
                "ranges >4x",
                "requests made",
            ],
            plan_rows,
            title="plan_symbol alone, costed on ground truth (pages true = ceil(true rows / 50,000) "
            "per range); requests made = the engine pass above",
        )
    )
    print()
    print(
        table(
            ["manifest", "liquidity", "events", "floor", "cold", "warm"],
            liq_rows,
            title="Requests per event by liquidity class (engine passes) vs the class's floor",
        )
    )
    print()
    print(
        table(
            [
                "manifest",
                "events",
                "target",
                "floor",
                "floor, any over-fetch",
                "cold",
                "warm",
                "target",
                "by any planner",
            ],
            reach_rows,
            title="What is reachable (req/event)",
        )
    )
    print(
        f"\n(per-event = one trades + one quotes range per event, paged; floor = best partition of each "
        f"symbol-day's windows into ranges of <= {BOUND:g}x over-fetch, paged at {PAGE_ROWS:,} rows, from "
        f"ground truth; * = simulated engine order, not measured; total {time.monotonic() - t_start:.0f} s)"
    )


if __name__ == "__main__":
    main()
