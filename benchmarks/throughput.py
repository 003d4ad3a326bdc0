"""Throughput at a request budget: our FetchEngine vs the official ``massive`` client vs a naive loop.

The simulator runs in its own process with 100 ms +- 20 ms latency per request, each response body
sent at 25 MB/s (``--transfer-mb-s``: a 50,000-row page, ~12 MB, takes ~0.5 s to arrive, as over a
real link) and, by default, a server-side rate limit equal to the budget (``--server-limit``). Its
tick data for the whole manifest is generated before any clock starts, so the server is never the
bottleneck: the event windows (all that massive and naive ask for), then, per budget, whatever
our engine's ranges reach between events, by one run of ours as it will be measured
(``SimHost.warm_ours``: the same budget, latency and transfer time; without it the simulator
generated those gap minutes during ours' measured run, on the same two cores). For each budget,
every client gets the same manifest (sized so ours takes about ``--seconds`` at the budget);
massive and naive stop starting new events after ``--cap`` x ``--seconds``.

* ours    ``FetchEngine`` (its defaults for the budget: workers ceil(0.4 s x budget) in [12, 32], over-fetch
          allowance min(50,000, 10^6 / budget) rows; hz 1, ratio bound 4, cold ``DensityStore``)
          with a fresh ``RequestBudget`` file at the budget; it fetches, shapes and writes parquet.
* massive ``massive.RESTClient(api_key, base=<simulator>, maxsize=12)`` driven by
          ``ThreadPoolExecutor(12)``: per event one ``list(list_trades(...))`` and one
          ``list(list_quotes(...))`` (``timestamp_gte/lt``, ``order="asc"``, ``limit=50000``; the
          iterators follow ``next_url``). Client-side limit the way users write it: a lock-shared
          spacing limiter (``next_slot += 1/budget``; ``time.sleep`` until the slot) before each
          ``list_*`` call. Pages after the first are inside the iterator and not limited; 429s are
          retried by the client's own urllib3 ``Retry`` (3 retries, honours Retry-After). An event
          whose call raises is counted as failed. Rows are only materialised (no parquet).
* naive   one thread, ``requests.Session``, ``?apiKey=``: per event one GET per endpoint plus one
          per ``next_url`` page, ``resp.json()``; the same spacing limiter before every GET; on a
          429 it sleeps Retry-After and repeats. Rows are only materialised.

Figures per run, from the simulator's request log: utilization = 200s per second over the active
interval / budget; 429 count; the most requests that arrived in any 1-s sliding window; requests
per event; bytes downloaded (the simulator's) and bytes per kept row (a kept row: a raw tick inside
an event window; the rest of what a merged range fetched is its gaps); events per minute (events
completed / run wall time); the CPU seconds of the client's and the simulator's processes per wall
second, and the share of all the host's cores that were busy (near 1.0: the host's CPU, not the
budget, bounded the run). Then ours/massive and ours/naive, and a ground-truth check of a sample
of ours' output files. ``--manifest`` takes several manifests, run one after another in one sitting.

    python benchmarks/throughput.py                               # clustered, budgets 10,50,100 (~5 min)
    python benchmarks/throughput.py --manifest in_play,clustered --budgets 20,50 --clients ours,massive
    python benchmarks/throughput.py --seconds 8 --budgets 10,50   # quick
    python benchmarks/throughput.py --manifest in_play --budgets 50 --clients ours --timeline  # per second
    python benchmarks/throughput.py --server-limit 40 --budgets 50
    python benchmarks/throughput.py --manifest in_play --budgets 50,50,50 --clients ours  # 3 runs
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import _bootstrap  # noqa: F401
import requests
from _common import API_KEY, SimHost, load_average, run_ours, served_rate, table, verify_outputs
from manifests import KINDS, Event, describe, make, to_work

from smallcaps_ingest.core.cost import default_workers
from smallcaps_ingest.core.plan import DensityStore, plan_symbol
from smallcaps_ingest.core.polygon import budget as budget_mod

CLIENT_WORKERS = 12
PAGE_LIMIT = 50_000


class Spacing:
    """The limiter users write: one slot every 1/rps seconds, shared by all threads."""

    def __init__(self, rps: float):
        self.interval = 1.0 / rps
        self.next = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            slot = max(now, self.next)
            self.next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


@dataclass
class Result:
    client: str
    events: int
    seconds: float
    failed: int = 0
    log: list = field(default_factory=list)
    max_1s: int = 0
    note: str = ""
    cpu_client: float = 0.0  # CPU seconds of this process during the run (all threads)
    cpu_sim: float = 0.0  # CPU seconds of the simulator's process during the run
    bytes: int = 0  # response bytes the simulator sent during the run
    rows_inside: int = 0  # raw rows inside the event windows that the client received
    host_busy: float = math.nan  # share of all the host's cores not idle during the run


def host_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all the host's cores so far (Linux /proc/stat; idle and iowait
    are not busy). A run whose host is busy near 1.0 is bound by the CPU, not by the budget."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return sum(ticks) - idle, sum(ticks)


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_massive(base_url: str, events: Sequence[Event], budget: float,
                deadline: float) -> tuple[int, int, float]:
    from massive import RESTClient

    client = RESTClient(api_key=API_KEY, base=base_url, maxsize=CLIENT_WORKERS)
    limiter = Spacing(budget)
    done = failed = 0
    lock = threading.Lock()

    def one(e: Event) -> None:
        nonlocal done, failed
        if time.monotonic() > deadline:
            return
        try:
            limiter.wait()
            trades = list(client.list_trades(e.symbol, timestamp_gte=e.start_ns, timestamp_lt=e.end_ns,
                                             order="asc", limit=PAGE_LIMIT))
            limiter.wait()
            quotes = list(client.list_quotes(e.symbol, timestamp_gte=e.start_ns, timestamp_lt=e.end_ns,
                                             order="asc", limit=PAGE_LIMIT))
            assert trades is not None and quotes is not None
            with lock:
                done += 1
        except Exception:  # noqa: BLE001 - a user's script would log it and go on
            with lock:
                failed += 1

    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENT_WORKERS) as pool:
        list(pool.map(one, events))
    return done, failed, time.monotonic() - t0


def run_naive(base_url: str, events: Sequence[Event], budget: float,
              deadline: float) -> tuple[int, int, float]:
    session = requests.Session()
    limiter = Spacing(budget)
    done = 0
    t0 = time.monotonic()

    def get(url: str, params: dict[str, object]) -> dict:
        while True:
            limiter.wait()
            r = session.get(url, params=params, timeout=30)
            if r.status_code == 429:
                time.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            r.raise_for_status()
            return r.json()

    for e in events:
        if time.monotonic() > deadline:
            break
        for kind in ("trades", "quotes"):
            rows: list[dict] = []
            body = get(f"{base_url}/v3/{kind}/{e.symbol}", {
                "timestamp.gte": e.start_ns, "timestamp.lt": e.end_ns, "order": "asc", "limit": PAGE_LIMIT,
                "apiKey": API_KEY})
            rows.extend(body.get("results", []))
            while "next_url" in body:
                body = get(body["next_url"], {"apiKey": API_KEY})
                rows.extend(body.get("results", []))
        done += 1
    return done, 0, time.monotonic() - t0


def planned_rpe(kind: str) -> float:
    """Requests per event the planner predicts (cold) for a sample of the manifest: sizes the runs."""
    events = make(kind, 400)
    ranges = 0
    for symbol, windows in to_work(events).items():
        ranges += len(plan_symbol(symbol, windows, DensityStore(None), 4.0))
    return ranges / len(events)


def measure(sim: SimHost, name: str, fn: Callable[[], tuple[int, int, float]],
            inside: Callable[[list], int] | None = None) -> Result:
    """One timed run; ``inside`` gives the rows inside the event windows it received (default:
    every row served, which is right for clients that ask for the windows alone)."""
    time.sleep(1.2)  # let the server's rate-limit window drain from the previous run
    sim.reset()
    c0, s0, h0 = time.process_time(), proc_cpu(sim.pid), host_ticks()
    events, failed, seconds = fn()
    c1, s1, h1 = time.process_time(), proc_cpu(sim.pid), host_ticks()
    log = sim.log()
    rows = inside(log) if inside else sum(x[6] for x in log if x[1] == 200)
    return Result(name, events, seconds, failed, log, sim.max_in_window(1.0), cpu_client=c1 - c0,
                  cpu_sim=s1 - s0, bytes=sim.counters()["bytes"], rows_inside=rows,
                  host_busy=(h1[0] - h0[0]) / max(1, h1[1] - h0[1]))


def timeline(log: Sequence) -> str:
    """Diagnostic: the 200s that arrived in each second, and rows per 200 (p25, median, p75, p95, max)."""
    ok = sorted((x[0], x[6]) for x in log if x[1] == 200)
    if not ok:
        return "    (no 200s)"
    t0 = ok[0][0]
    per_s = [0] * (int(ok[-1][0] - t0) + 1)
    for t, _ in ok:
        per_s[int(t - t0)] += 1
    q = sorted(n for _, n in ok)
    quart = [q[min(len(q) - 1, int(f * len(q)))] for f in (0.25, 0.5, 0.75, 0.95)]
    return (f"    200s per second: {' '.join(map(str, per_s))}\n"
            f"    rows per 200: p25 {quart[0]:,}  median {quart[1]:,}  p75 {quart[2]:,}  p95 {quart[3]:,}  "
            f"max {q[-1]:,}")


def row(budget: float, server_limit: float | None, r: Result) -> tuple[object, ...]:
    rate, span, ok = served_rate(r.log)
    n429 = sum(1 for x in r.log if x[1] == 429)
    other = sum(1 for x in r.log if x[1] not in (200, 429))
    reqs = len(r.log)
    rpe = reqs / r.events if r.events else math.nan
    epm = r.events / r.seconds * 60 if r.seconds > 0 else math.nan
    util_server = rate / server_limit if server_limit else math.nan
    cores = f"{r.cpu_client / r.seconds:.2f} / {r.cpu_sim / r.seconds:.2f}" if r.seconds else "-"
    per_row = r.bytes / r.rows_inside if r.rows_inside else math.nan
    return (f"{budget:g}", r.client, r.events, r.failed, reqs, f"{span:.1f}", rate, rate / budget,
            util_server, n429, other, r.max_1s, rpe, r.bytes / 1e6, per_row, epm, cores, r.host_busy)


def run_client(sim: SimHost, client: str, events: Sequence[Event], budget: float, a: argparse.Namespace,
               out: Path) -> tuple[Result, str | None]:
    """One measured run of one client; for ours also the ground-truth check of a sample of events."""
    cap = a.seconds * a.cap
    if client == "ours":
        got: list[int] = []

        def go() -> tuple[int, int, float]:
            run = run_ours(sim.base_url, events, budget, out, workers=a.workers or default_workers(budget))
            got.append(run.rows_inside)
            return run.events, run.errors, run.seconds

        r = measure(sim, client, go, inside=lambda _log: got[0])
        step = max(1, len(events) // max(1, a.verify))
        checked = verify_outputs(out / "data", events[::step][: a.verify])
        bad = [x for x in checked if not x[-1]]
        return r, (f"budget {budget:g}: {len(checked) - len(bad)}/{len(checked)} events OK"
                   + ("" if not bad else f", MISMATCH (event, trades got/want, quotes got/want): {bad[:3]}"))
    runner = {"massive": run_massive, "naive": run_naive}.get(client)
    if runner is not None:
        result = measure(sim, client, lambda: runner(sim.base_url, events, budget, time.monotonic() + cap))
        return result, None
    raise SystemExit(f"unknown client {client!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="10,50,100", help="request budgets (req/s), comma-separated")
    p.add_argument("--manifest", default="clustered",
                   help=f"manifests, comma-separated, run in this order: {', '.join(KINDS)}")
    p.add_argument("--seconds", type=float, default=20.0, help="target duration of ours' run at the budget")
    p.add_argument("--cap", type=float, default=1.4, help="massive/naive stop starting events after "
                   "cap x seconds")
    p.add_argument("--server-limit", default="budget",
                   help="simulator rate_limit_rps: 'budget' (= each budget), 'none', or a number")
    p.add_argument("--clients", default="ours,massive,naive")
    p.add_argument("--verify", type=int, default=24, help="ours' events checked against ground truth")
    p.add_argument("--timeline", action="store_true",
                   help="diagnostic: print ours' 200s per second and rows per response")
    p.add_argument("--latency-ms", type=float, default=100.0)
    p.add_argument("--jitter-ms", type=float, default=20.0)
    p.add_argument("--transfer-mb-s", type=float, default=25.0,
                   help="each response body is sent at this many MB/s (0: loopback speed)")
    p.add_argument(
        "--workers", type=int, default=None, help="ours' worker threads (default: the engine's, per budget)"
    )
    p.add_argument("--what-if-margin", type=float, default=None, metavar="FRACTION",
                   help="what-if: override budget.WINDOW_MARGIN (0.01) in this process")
    p.add_argument("--what-if-aimd", default=None, metavar="DECREASE,INCREASE",
                   help="what-if: override budget.DECREASE_FACTOR (0.7) and INCREASE_PER_SECOND (0.02)")
    a = p.parse_args()
    what_if = []
    if a.what_if_margin is not None:
        budget_mod.WINDOW_MARGIN = a.what_if_margin
        what_if.append(f"WINDOW_MARGIN={a.what_if_margin:g}")
    if a.what_if_aimd:
        dec, inc = (float(x) for x in a.what_if_aimd.split(","))
        budget_mod.DECREASE_FACTOR, budget_mod.INCREASE_PER_SECOND = dec, inc
        what_if.append(f"DECREASE_FACTOR={dec:g}, INCREASE_PER_SECOND={inc:g}")
    if what_if:
        print("WHAT-IF (engine constants overridden in this process): " + "; ".join(what_if))
    budgets = [float(x) for x in a.budgets.split(",") if x.strip()]
    clients = [c.strip() for c in a.clients.split(",") if c.strip()]

    t_start = time.monotonic()
    print(f"load average at start: {load_average()}")
    rate = a.transfer_mb_s * 1e6 if a.transfer_mb_s > 0 else None
    rows: list[tuple[object, ...]] = []
    ratio_rows: list[tuple[object, ...]] = []
    checks: list[str] = []
    with SimHost(latency_ms=a.latency_ms, latency_jitter_ms=a.jitter_ms, transfer_bytes_per_s=rate) as sim, \
            tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        for manifest in [m.strip() for m in a.manifest.split(",") if m.strip()]:
            run_manifest(sim, Path(tmp) / manifest, manifest, budgets, clients, a, rows, ratio_rows, checks)
            print(f"  load average after {manifest}: {load_average()}", flush=True)

    print()
    print(table(
        ["manifest", "budget", "client", "events", "failed", "requests", "active s", "served/s", "util",
         "util(srv)", "429s", "other", "max 1s", "req/event", "MB", "B/kept row", "events/min",
         "cores client/sim", "host busy"],
        rows,
        title=f"Throughput, latency {a.latency_ms:g}+-{a.jitter_ms:g} ms, transfer "
              f"{f'{a.transfer_mb_s:g} MB/s per response' if rate else 'off'}, "
              f"server limit {a.server_limit}, "
              f"ours with {a.workers or 'ceil(0.4 s x budget) in [12, 32]'} workers"
              + (f" [WHAT-IF {'; '.join(what_if)}]" if what_if else ""),
    ))
    if ratio_rows:
        print()
        print(table(["manifest", "budget", "ratio", "served/s", "events/min", "req/event", "B/kept row"],
                    ratio_rows, title="Ratios (ours / other)"))
    if checks:
        print()
        print("Ground truth (trades by sequence number, sum of 1 Hz quote_count = raw quotes):")
        for c in checks:
            print(f"  {c}")
    print(f"\n(util = 200s per second over the active interval / budget; util(srv) = the same / server "
          f"limit; max 1s = most arrivals in any 1-s sliding window at the server; MB = response bytes "
          f"sent by the simulator; B/kept row = those bytes / raw rows inside the event windows; cores "
          f"client/sim = CPU seconds per wall second of the client's and the simulator's process; "
          f"host busy = share of all the host's cores not idle during the run (near 1: the CPU, "
          f"not the budget, bounds it); load "
          f"average at end {load_average()}; total {time.monotonic() - t_start:.0f} s)")


def run_manifest(sim: SimHost, tmp: Path, manifest: str, budgets: Sequence[float], clients: Sequence[str],
                 a: argparse.Namespace, rows: list, ratio_rows: list, checks: list) -> None:
    """Every client at every budget on one manifest (sized per budget); rows appended to the tables."""
    rpe = planned_rpe(manifest)
    sizes = {b: max(10, round(b * a.seconds / rpe)) for b in budgets}
    manifests = {b: make(manifest, n) for b, n in sizes.items()}
    largest = max(manifests.values(), key=len)
    print(f"manifest {manifest}: planner predicts {rpe:.2f} req/event; per budget: "
          + ", ".join(f"{b:g} req/s -> {len(m)} events" for b, m in manifests.items()))
    print(f"largest: {describe(largest)}")
    rows_warm, cpu, minutes, nbytes = sim.warm(largest)
    print(f"simulator warmed: {rows_warm:,} rows in {minutes:,} minutes ({nbytes / 2**30:.2f} GiB) in "
          f"{cpu:.1f} s CPU", flush=True)
    for i, b in enumerate(budgets):  # a budget given twice is measured twice, each run on fresh dirs
        limit = b if a.server_limit == "budget" else None if a.server_limit == "none" else float(
            a.server_limit)
        events = manifests[b]
        if "ours" in clients:  # the gap minutes its ranges reach, generated before the clock starts
            secs = sim.warm_ours(events, b, tmp / f"warm-{i}-{b:g}", a.workers or default_workers(b))
            print(f"  budget {b:g} req/s: simulator warmed for ours' ranges by a run of ours "
                  f"({secs:.1f} s)", flush=True)
        sim.set(rate_limit_rps=limit)
        results: dict[str, Result] = {}
        for c in clients:
            print(f"  budget {b:g} req/s, server limit {limit}, {c}: {len(events)} events ...", end="",
                  flush=True)
            r, check = run_client(sim, c, events, b, a, tmp / f"ours-{i}-{b:g}")
            if check:
                checks.append(f"{manifest} {check}")
            results[c] = r
            print(f" {r.events} events in {r.seconds:.1f} s", flush=True)
            if a.timeline and c == "ours":
                print(timeline(r.log))
            rows.append((manifest, *row(b, limit, r)))
        if "ours" in results:
            o = results["ours"]
            o_rate = served_rate(o.log)[0]
            o_epm = o.events / o.seconds * 60
            o_bpr = o.bytes / o.rows_inside if o.rows_inside else math.nan
            for c in ("massive", "naive"):
                if c in results:
                    x = results[c]
                    x_rate = served_rate(x.log)[0]
                    x_epm = x.events / x.seconds * 60 if x.seconds else math.nan
                    x_rpe = len(x.log) / x.events if x.events else math.nan
                    x_bpr = x.bytes / x.rows_inside if x.rows_inside else math.nan
                    o_rpe = len(o.log) / o.events
                    ratio_rows.append((manifest, f"{b:g}", f"ours/{c}",
                                       o_rate / x_rate if x_rate else math.nan,
                                       o_epm / x_epm if x_epm else math.nan, o_rpe / x_rpe, o_bpr / x_bpr))


if __name__ == "__main__":
    main()
