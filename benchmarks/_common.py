"""Shared pieces of the benchmarks: tables, ground-truth counting, the engine run, a simulator host.

``SimHost`` runs the simulator in its own process (driven over a pipe), so the client under test
and the server do not share one GIL on this 2-core machine, and so the server's tick generation
can be done before the clock starts (``warm``). The simulator's code is not changed: the host
starts it, enlarges its minute cache for the warm-up and reads its counters and request log.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _bootstrap  # noqa: F401
import polars as pl
from manifests import Event

from smallcaps_ingest import simulator as simmod
from smallcaps_ingest import storage
from smallcaps_ingest.core.engine import FetchEngine, SymbolOutcome, merge_stats
from smallcaps_ingest.core.plan import DensityStore, Window, et_day
from smallcaps_ingest.core.polygon.budget import RequestBudget
from smallcaps_ingest.core.polygon.client import PolygonClient
from smallcaps_ingest.core.store import event_dir
from smallcaps_ingest.simulator import market as simmarket

API_KEY = "benchmark-key"  # the simulator accepts any non-empty key
KINDS = ("trades", "quotes")


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], title: str | None = None) -> str:
    body = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [title] if title else []
    out.append("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths,
                                                                                          strict=True))))
    out.append(line)
    for r in body:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                              strict=True))))
    return "\n".join(out)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        a = abs(v)
        return f"{v:.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 0.1 else f"{v:.3f}"
    return str(v)


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------
def union_intervals(events: Iterable[Event]) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """Union of the event windows per (symbol, ET day)."""
    by: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for e in sorted(events, key=lambda e: (e.symbol, e.start_ns)):
        by.setdefault((e.symbol, et_day(e.start_ns)), []).append((e.start_ns, e.end_ns))
    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for key, ivs in by.items():
        merged: list[list[int]] = []
        for a, b in sorted(ivs):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        out[key] = [(a, b) for a, b in merged]
    return out


class Truth:
    """Sorted sip timestamps of every tick inside the event windows, from ``simulator.ground_truth``."""

    def __init__(self, events: Sequence[Event]):
        self.unions = union_intervals(events)
        self._sips: dict[tuple[str, str, str], list[int]] = {}

    def sips(self, kind: str, symbol: str, day: str) -> list[int]:
        key = (kind, symbol, day)
        if key not in self._sips:
            out: list[int] = []
            for a, b in self.unions.get((symbol, day), []):
                out.extend(r["sip_timestamp"] for r in simmod.ground_truth(kind, symbol, a, b))
            self._sips[key] = out
        return self._sips[key]

    def symbol_sips(self, kind: str, symbol: str) -> list[int]:
        """Every inside tick of the symbol, all days, in time order (ISO days sort in time order)."""
        key = (kind, symbol, "*")
        if key not in self._sips:
            days = sorted(d for s, d in self.unions if s == symbol)
            self._sips[key] = [t for d in days for t in self.sips(kind, symbol, d)]
        return self._sips[key]

    def count(self, kind: str, symbol: str, start_ns: int, end_ns: int) -> int:
        """Ticks in [start, end) that lie inside some event window of the symbol (any days)."""
        s = self.symbol_sips(kind, symbol)
        return bisect_left(s, end_ns) - bisect_left(s, start_ns)

    def inside_total(self, kind: str) -> int:
        return sum(len(self.sips(kind, sym, day)) for sym, day in self.unions)


def verify_outputs(data_dir: str | Path,
                   events: Sequence[Event]) -> list[tuple[str, int, int, int, int, bool]]:
    """(event_id, trades got/want, quotes got/want, ok) for each event, against ground truth.

    trades.parquet must hold exactly the ground-truth trades (same sequence numbers); quotes.parquet
    is sampled at 1 Hz, so the sum of its ``quote_count`` must equal the ground-truth quote count.
    """
    out = []
    for e in events:
        d = event_dir(data_dir, e.symbol, e.event_id)
        trades = pl.read_parquet(storage.source(d / "trades.parquet"))  # a local path or an s3:// URL
        quotes = pl.read_parquet(storage.source(d / "quotes.parquet"))
        gt_t = simmod.ground_truth("trades", e.symbol, e.start_ns, e.end_ns)
        gt_q = simmod.ground_truth("quotes", e.symbol, e.start_ns, e.end_ns)
        got_q = int(quotes["quote_count"].sum()) if quotes.height else 0
        ok = (
            trades["sequence_number"].to_list() == [r["sequence_number"] for r in gt_t]
            and got_q == len(gt_q)
        )
        out.append((e.event_id, trades.height, len(gt_t), got_q, len(gt_q), ok))
    return out


# ----------------------------------------------------------------------------------------------
# Our engine
# ----------------------------------------------------------------------------------------------
@dataclass
class OursRun:
    outcomes: list[SymbolOutcome]
    seconds: float
    events: int
    requests: int
    throttled: int
    rows_raw: int
    rows_kept: int
    budget_wait_s: float
    errors: int
    rows_inside: int = 0  # raw rows inside the event windows


def run_ours(base_url: str, events: Sequence[Event], budget_rps: float, workdir: str | Path, *,
             density: DensityStore | None = None, workers: int = 12, data_dir: str | Path | None = None,
             overfetch_rows: int | None = None, label: str = "ours") -> OursRun:
    """One ``FetchEngine.run`` with production-like settings and a fresh budget file."""
    from manifests import to_work

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    budget_path = workdir / f"budget-{os.getpid()}-{time.monotonic_ns()}.sqlite"
    return run_engine(base_url, to_work(events), budget_rps, budget_path, data_dir or workdir / "data",
                      density=density, workers=workers, overfetch_rows=overfetch_rows, label=label)


def run_engine(base_url: str, work: Mapping[str, Sequence[Window]], budget_rps: float,
               budget_path: str | Path, data_dir: str | Path, *, density: DensityStore | None = None,
               workers: int = 12, bucket: str = "polygon", label: str = "ours",
               overfetch_rows: int | None = None) -> OursRun:
    """``FetchEngine.run`` over ``work`` at 1 Hz, over-fetch bound 4 (allowance: the engine's default
    for the budget unless given), timed; errors are printed."""
    budget = RequestBudget(budget_rps, budget_path, bucket=bucket)
    client = PolygonClient(base_url, API_KEY, budget, workers=workers)
    engine = FetchEngine(client, str(data_dir), workers=workers, hz=1.0, max_overfetch=4.0,
                         overfetch_rows=overfetch_rows,
                         density=density if density is not None else DensityStore(None))
    t0 = time.monotonic()
    outcomes = engine.run(work)
    seconds = time.monotonic() - t0
    client.close()
    budget.close()
    st = merge_stats(outcomes)
    errors = [o for o in outcomes if o.error is not None]
    for o in errors[:3]:
        print(f"  ! {label}: {o.symbol}: {o.error!r}")
    return OursRun(outcomes, seconds, sum(o.written for o in outcomes), st.total_requests, st.throttled,
                   st.rows_raw, st.rows_kept, st.budget_wait_s, len(errors), st.rows_inside)


# ----------------------------------------------------------------------------------------------
# Simulator in its own process
# ----------------------------------------------------------------------------------------------
Record = tuple[float, int, str, str | None, int | None, int | None, int, bool]  # t, status, endpoint, ...


def _host_main(conn: Any, config: dict[str, Any]) -> None:
    sim = simmod.Simulator(simmod.SimConfig(**config)).start()
    conn.send(sim.base_url)
    while True:
        cmd, *args = conn.recv()
        if cmd == "stop":
            sim.stop()
            conn.send(None)
            return
        if cmd == "set":
            for k, v in args[0].items():
                setattr(sim.config, k, v)
            conn.send(None)
        elif cmd == "config":
            conn.send(dict(vars(sim.config)))
        elif cmd == "reset":
            sim.reset_counters()
            conn.send(None)
        elif cmd == "counters":
            conn.send(sim.counters())
        elif cmd == "max_in_window":
            conn.send(sim.max_in_window(*args))
        elif cmd == "log":
            conn.send([(r.t, r.status, r.endpoint, r.ticker, r.gte_ns, r.lt_ns, r.rows, r.cursor)
                       for r in sim.request_log()])
        elif cmd == "warm":
            # Generate (and keep) every minute the runs will ask for, before any clock starts.
            cache = simmarket.CACHE
            cache.max_minutes = max(cache.max_minutes, args[1])
            cache.max_bytes = max(cache.max_bytes, args[2])
            t0 = time.process_time()
            rows = 0
            for kind, ticker, a, b in args[0]:
                rows += len(simmod.ground_truth(kind, ticker, a, b))
            conn.send((rows, time.process_time() - t0, len(cache._d), cache._bytes))
        else:
            conn.send(ValueError(cmd))


class SimHost:
    """The simulator in a child process; same counters and log as ``Simulator``."""

    def __init__(self, **config: Any):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_host_main, args=(child, config), daemon=True, name="simhost")
        self._proc.start()
        self.base_url: str = self._conn.recv()
        self.pid = self._proc.pid

    def _call(self, *msg: Any) -> Any:
        self._conn.send(msg)
        out = self._conn.recv()
        if isinstance(out, Exception):
            raise out
        return out

    def set(self, **kw: Any) -> None:
        self._call("set", kw)

    def reset(self) -> None:
        self._call("reset")

    def counters(self) -> dict[str, Any]:
        return self._call("counters")

    def max_in_window(self, seconds: float = 1.0, served_only: bool = False) -> int:
        return self._call("max_in_window", seconds, served_only)

    def log(self) -> list[Record]:
        return self._call("log")

    def warm(self, events: Sequence[Event], max_minutes: int = 400_000, max_bytes: int = 12 << 30,
             ) -> tuple[int, float, int, int]:
        """Generate the minutes of every event window (what every client asks for) before any clock
        starts; our engine's ranges also reach into the gaps between events: see ``warm_ours``."""
        jobs = [(kind, sym, a, b) for (sym, _), ivs in union_intervals(events).items() for a, b in ivs
                for kind in KINDS]
        return self._call("warm", jobs, max_minutes, max_bytes)

    def warm_ours(self, events: Sequence[Event], budget_rps: float, workdir: str | Path,
                  workers: int) -> float:
        """Run our engine once over ``events`` as the measured run will (the same budget, allowance,
        workers, latency and transfer time, the server unthrottled), so the simulator has generated
        the minutes the measured run asks for; returns the seconds it took.

        Its ranges reach into the gaps between events, which ``warm`` does not generate. A minute
        first asked for during a measured run is generated then, on the same two cores as the client:
        in the first in_play run at 50 req/s the simulator used 0.57 of a core against 0.10 in a second
        run of the same manifest, and ours reached 0.90 of the budget against 0.98 (D11). The ranges
        follow the densities and the page times learned in flight (D18), so a warm-up without latency
        (pages that take no time) planned other ranges than the measured run: the simulator used 0.46
        and 0.62 of a core during in_play and clustered_multiday at 20 req/s after one (session 16)."""
        limit = self._call("config")["rate_limit_rps"]
        self.set(rate_limit_rps=None)
        try:
            run = run_ours(self.base_url, events, budget_rps, workdir, workers=workers, label="warm-up")
        finally:
            self.set(rate_limit_rps=limit)
            self.reset()
        return run.seconds

    def stop(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            self._call("stop")
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.terminate()

    def __enter__(self) -> SimHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def served_rate(log: Sequence[Record]) -> tuple[float, float, int]:
    """(200-status arrivals per second over the active interval, interval seconds, 200 count).

    The active interval runs from the first to the last arrival. The rate counts the 200s that
    arrived in the first ``floor(span)`` whole seconds of it, so a limiter that releases its grants
    in bursts (N at once, once per window) is measured at its true rate, not N extra.
    """
    if not log:
        return 0.0, 0.0, 0
    ts = sorted(r[0] for r in log)
    t0, t1 = ts[0], ts[-1]
    span = t1 - t0
    ok = sorted(r[0] for r in log if r[1] == 200)
    whole = math.floor(span)
    if whole < 1:
        return (len(ok) / span if span > 0 else float("nan")), span, len(ok)
    n = bisect_left(ok, t0 + whole)
    return n / whole, span, len(ok)
