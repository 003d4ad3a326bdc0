"""``smallcaps-ingest plan``: how close its request estimate comes to what a run then makes, and
how long it takes on the users' manifest size.

Accuracy (against the in-process simulator, no latency, no faults): each manifest's symbol-days are
split in two halves per symbol (earlier days: run A, later days: run B, same symbols).

* cold: ``preview.estimate`` for B with no densities, then the engine runs B on a fresh tree
  with a fresh ``DensityStore``; requests estimated vs made.
* warm: the engine runs A (its ``DensityStore`` saved to a file), ``preview.estimate`` for B with
  that file, then the engine runs B with a copy of it; requests estimated vs made.

The allowance is the engine's default at 90 req/s (11,111 rows) in both estimate and runs.

Timing (``--timing``): a 572,850-event manifest from status_bench (150 events per symbol, one a
day), the CLI in a fresh process, three runs each, wall and CPU (user + system) seconds: on a tree
with nothing fetched (everything is planned) and on a tree where 99 % is complete (status run
first, so the tree's directories are in the OS cache when plan walks them).

    python benchmarks/plan_bench.py                       # accuracy, ~3 min
    python benchmarks/plan_bench.py --timing --events 572850
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import _bootstrap  # noqa: F401
from _common import load_average, run_ours, table
from manifests import Event, describe, make

from smallcaps_ingest.core.cost import default_workers
from smallcaps_ingest.core.plan import DensityStore, et_day, overfetch_allowance
from smallcaps_ingest.ops import preview
from smallcaps_ingest.simulator import SimConfig, Simulator

CLI = Path(sys.executable).with_name("smallcaps-ingest")
SHAPES = (("in_play_multiday", 1500), ("clustered_multiday", 1500), ("isolated", 600), ("in_play", 600))
ALLOWANCE = overfetch_allowance(90.0)
# The runs' budget and workers, which the estimate is given too: the engine's merge rule depends on
# both (workers / max_rps, decision record D18), so an estimate at other settings plans other ranges.
RPS = 90.0
WORKERS = default_workers(RPS)


def halves(events: list[Event]) -> tuple[list[Event], list[Event]]:
    """Per symbol, events of its earlier half of days (A) and of the later half (B)."""
    days: dict[str, list[str]] = defaultdict(list)
    for e in events:
        d = et_day(e.start_ns)
        if d not in days[e.symbol]:
            days[e.symbol].append(d)
    cut = {s: sorted(ds)[len(ds) // 2] for s, ds in days.items() if len(ds) > 1}
    a = [e for e in events if e.symbol in cut and et_day(e.start_ns) < cut[e.symbol]]
    b = [e for e in events if e.symbol in cut and et_day(e.start_ns) >= cut[e.symbol]]
    return a, b


def estimate(events: list[Event], density: DensityStore) -> int:
    manifest: dict[str, list] = {}
    for e in events:
        manifest.setdefault(e.symbol, []).append((e.window, "ALL"))
    settings = preview.Settings(max_rps=RPS, overfetch_rows=ALLOWANCE, workers=WORKERS)
    res = preview.estimate(manifest, {}, density, settings)
    return int(res["requests"]["total"])


def accuracy() -> None:
    rows = []
    with Simulator(SimConfig()) as sim, tempfile.TemporaryDirectory() as tmp:
        for kind, n in SHAPES:
            events = make(kind, n)
            a, b = halves(events)
            work = Path(tmp) / kind
            cold_est = estimate(b, DensityStore(None))
            cold = run_ours(sim.base_url, b, RPS, work / "cold", workers=WORKERS,
                            overfetch_rows=ALLOWANCE).requests
            dpath = work / "density.json"
            run_ours(
                sim.base_url, a, RPS, work / "a", density=DensityStore(dpath), workers=WORKERS,
                overfetch_rows=ALLOWANCE,
            )
            warm_est = estimate(b, DensityStore(dpath))
            shutil.copy(dpath, work / "density_b.json")
            again = DensityStore(work / "density_b.json")
            warm = run_ours(
                sim.base_url, b, RPS, work / "warm", density=again, workers=WORKERS, overfetch_rows=ALLOWANCE
            ).requests
            rows.append((kind, describe(b), cold_est, cold, f"{cold_est / cold - 1:+.1%}",
                         warm_est, warm, f"{warm_est / warm - 1:+.1%}"))  # fmt: skip
            print(rows[-1], flush=True)
    heads = ("manifest", "run B", "cold est", "cold made", "cold err", "warm est", "warm made", "warm err")
    print(table(heads, rows, "plan: estimated vs made requests"))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _time_cli(data_dir: Path, runs: int = 3) -> tuple[list[tuple[float, float]], dict]:
    """(wall s, CPU s of the process: user + system) of each run, and the last run's figures."""
    out: list[tuple[float, float]] = []
    res: dict = {}
    env = {**os.environ, "POLYGON_MAX_RPS": "90"}
    for _ in range(runs):
        t, cpu = time.perf_counter(), _cpu()
        p = subprocess.run([str(CLI), "plan", "--json", "--data-dir", str(data_dir)], env=env,
                           capture_output=True, text=True, check=True)  # fmt: skip
        out.append((time.perf_counter() - t, _cpu() - cpu))
        res = json.loads(p.stdout)
    return out, res


def _line(res: dict, secs: list[tuple[float, float]]) -> str:
    walls = ", ".join(f"{w:.2f}" for w, _ in secs)
    cpus = ", ".join(f"{c:.2f}" for _, c in secs)
    return (f"{res['events_to_fetch']} events to fetch, {res['requests']['total']} requests; wall s {walls}; "
            f"CPU s {cpus}; load average {load_average()}")  # fmt: skip


def timing(n: int) -> None:
    from status_bench import event_ids, generate

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty"
        empty.mkdir()
        event_ids(n, 150).write_parquet(empty / "manifest.parquet")
        secs, res = _time_cli(empty)
        print(f"nothing fetched: {_line(res, secs)}")
        full = Path(tmp) / "full"
        generate(full, n, 150, placeholders=True)
        subprocess.run(
            [str(CLI), "status", "--no-instance", "--data-dir", str(full)], capture_output=True, check=True
        )
        secs, res = _time_cli(full)
        print(f"99 % complete (status cache warm): {_line(res, secs)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timing", action="store_true", help="time the CLI instead of measuring accuracy")
    p.add_argument("--events", type=int, default=572_850)
    a = p.parse_args()
    if a.timing:
        timing(a.events)
    else:
        accuracy()


if __name__ == "__main__":
    main()
