"""Orchestration overhead of a backfill through the daemon (issue item 1d), vs the bare fetch.

    python benchmarks/backfill_bench.py                     # 1,600 symbols (~13-15 min on 2 shared cores)
    python benchmarks/backfill_bench.py --symbols 100       # quick (~3 min)
    python benchmarks/backfill_bench.py --rps 100 --latency-ms 50 --jitter-ms 10 --window-s 45 --keep
    python benchmarks/backfill_bench.py --symbols 400 --skip-direct --policy multi_run:100   # what-if
    python benchmarks/backfill_bench.py --env DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS=1  # what-if
    python benchmarks/backfill_bench.py --storage postgres  # deploy/dagster.yaml on a database of its own

What runs, all on loopback, in a fresh temporary directory:

1. An events file of ``--symbols`` synthetic symbols (hash tickers of ``manifests.universe``), one
   RTH event each on a trading day of 2024; the manifest's window is tiny (``--window-s``, default
   45 s: 15 s before, 30 s after), so every event is one trades and one quotes request.
2. The simulator in its own process (``_common.SimHost``, ``--latency-ms`` +- ``--jitter-ms``),
   its tick data for every window generated before any clock starts.
3. *Direct*: the same windows fetched by ``FetchEngine`` in this process, without Dagster, set up as
   ``event_windows`` sets it up (12 workers, hz 1, over-fetch 4, density file, a fresh budget file at
   ``--rps``), then ``check.evaluate_symbol`` over every symbol (the checks' disk work, timed apart).
4. *Dagster*: a fresh DAGSTER_HOME (a copy of dagster_home/dagster.yaml: queued runs, pool
   ``polygon_api``, run monitoring), ``dagster asset materialize --select manifest`` (registers the
   symbol partitions), then ``dagster dev`` (webserver + daemon) on 127.0.0.1 and a backfill of every
   ``event_windows`` partition launched through GraphQL, as the UI does. ``BackfillPolicy.single_run()``
   makes the daemon create one run for the whole (contiguous) selection. Polled once a second until
   every run succeeded, then until the backfill itself is COMPLETED_SUCCESS (the daemon's next tick).
5. After ``dagster dev`` is stopped: the run records and the run's event log, read from the instance,
   give the timeline (launch -> run created -> dequeued -> run process -> step process -> engine ->
   last event -> run success -> backfill completed); the simulator's counters and request log give
   the requests and the engine's fetch time (first to last arrival: the simulator serves only the
   backfill then); the materializations' metadata give the requests the engine counted.
   Per partition a range run's step writes a log line and a checkpoint as the symbol finishes,
   then (when the step succeeds) Dagster's record of every partition and eight check evaluations
   per partition: the gaps between those events' timestamps split the recording cost. A
   single-partition run (``multi_run:1``) writes a log line and one record. The read Dagster makes
   per partition for a check result is then timed alone, on the finished instance.

``--policy multi_run:N`` runs the backfill against the project's definitions with
``BackfillPolicy.multi_run(N)`` (a generated definitions file; assets.py is not changed), ``--env``
adds environment variables to the Dagster processes.

The last table projects the orchestration to the users' whole job (``full_job``): what its much
longer fetch would not overlap, against issue 19's goal (< 5 % of that fetch).

Timings are wall-clock on a shared 2-core machine: noisy; the load average is printed. Most of a
1,600-partition backfill is the run recording its events, so the whole script takes ~13-15 min.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import _bootstrap  # noqa: F401
import polars as pl
from _common import API_KEY, SimHost, load_average, run_engine, table
from manifests import _DAYS, ET, Event, universe

from smallcaps_ingest.core import check
from smallcaps_ingest.core.engine import windows_from_frame
from smallcaps_ingest.core.events import read_events
from smallcaps_ingest.core.manifest import build_manifest
from smallcaps_ingest.core.plan import DensityStore, Window

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))  # the `dagster dev` helpers are shared with the browser test
from smallcaps_ingest_tests import ui_helpers as ui  # noqa: E402
from smallcaps_ingest_tests.team_helpers import database_mb, pg_database  # noqa: E402
from smallcaps_ingest_tests.ui_helpers import DagsterDev, tail  # noqa: E402

ASSET = "event_windows"
MAT, CHK, LOG = "ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION", "LOGS"
# The users' whole job (issue 19): its events, requests per event, and the budget
FULL_JOB_SYMBOLS, FULL_JOB_EVENTS, FULL_JOB_REQ_PER_EVENT, FULL_JOB_RPS = 1_600, 572_850, 1.3, 100.0


# ----------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------
def make_events(n: int, seed: int = 5) -> pl.DataFrame:
    """One RTH event (10:00-15:30 ET, whole seconds) per symbol, each on a random trading day of 2024."""
    rng = random.Random(seed)
    rows = []
    for sym in sorted(universe(n, seed=seed)):
        day = rng.choice(_DAYS)
        sec = rng.randrange(10 * 3600, 15 * 3600 + 1800)
        t = datetime(day.year, day.month, day.day, sec // 3600, sec // 60 % 60, sec % 60, tzinfo=ET)
        rows.append((sym, "volume_spike", t))
    return pl.DataFrame(
        rows,
        schema={"symbol": pl.String, "event_type": pl.String, "timestamp": pl.Datetime("us", "UTC")},
        orient="row",
    )


def build_work(
    events_path: Path, before_min: float, after_min: float
) -> tuple[pl.DataFrame, dict[str, list[Window]]]:
    """The manifest exactly as the ``manifest`` asset builds it, and the asset's ``work`` mapping."""
    from datetime import timedelta

    df, _ = build_manifest(
        read_events(events_path), before=timedelta(minutes=before_min), after=timedelta(minutes=after_min)
    )
    work = {
        str(sym[0]): windows_from_frame(part)
        for sym, part in df.partition_by("symbol", as_dict=True, maintain_order=True).items()
    }
    return df, work


# ----------------------------------------------------------------------------------------------
# Direct engine run (no Dagster)
# ----------------------------------------------------------------------------------------------
def direct_run(
    base_url: str, work: Mapping[str, Sequence[Window]], rps: float, workers: int, root: Path
) -> dict[str, Any]:
    data = root / "direct_data"
    run = run_engine(base_url, work, rps, root / "direct_budget.sqlite", data,
                     density=DensityStore(f"{data}/_state/density.json"), workers=workers,
                     bucket=urlsplit(base_url).netloc, label="direct")
    # the checks' disk work per symbol, as event_windows runs it per partition (no Dagster)
    t1 = time.monotonic()
    bad: Counter[str] = Counter()
    for sym, windows in work.items():
        bad.update(r.name for r in check.evaluate_symbol(str(data), sym, windows, 1.0) if not r.passed)
    checks_s = time.monotonic() - t1
    return {
        "seconds": run.seconds,
        "requests": run.requests,
        "events": run.events,
        "errors": run.errors,
        "budget_wait_s": run.budget_wait_s,
        "429s": run.throttled,
        "max_symbol_seconds": max((o.seconds for o in run.outcomes), default=0.0),
        "checks_s": checks_s,
        "checks_failed_by_name": dict(bad),
    }


def launch_backfill(dev: DagsterDev, partitions: Sequence[str]) -> str:
    return ui.launch_backfill(dev, ASSET, partitions, title="backfill_bench")


def wait_backfill(
    dev: DagsterDev, backfill_id: str, t_launch: float, timeout: float, data_dir: Path
) -> dict[str, Any]:
    """Wall-clock marks (time.time()) of: first run seen, every run succeeded, backfill completed."""
    marks: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    last_status = None
    next_progress = time.time() + 30.0
    while True:
        dev._alive_or_fail()
        bf = dev.gql(ui.BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        if bf["__typename"] != "PartitionBackfill":
            raise RuntimeError(f"backfill {backfill_id}: {bf}")
        now = time.time()
        runs = bf.get("runs") or []
        if runs and "run_seen" not in marks:
            marks["run_seen"] = now
        if bf["status"] != last_status:
            print(
                f"  [{now - t_launch:6.1f}s] backfill {bf['status']}, runs "
                f"{Counter(r['status'] for r in runs) or '-'}",
                flush=True,
            )
            last_status = bf["status"]
        if bf["status"] in ui.BACKFILL_BAD or any(r["status"] in ui.RUN_BAD for r in runs):
            raise RuntimeError(
                f"backfill {bf['status']} {bf.get('error')}: runs {runs}\n{tail(dev.log_path)}"
            )
        if runs and all(r["status"] == "SUCCESS" for r in runs) and "runs_done" not in marks:
            marks["runs_done"] = now
            print(f"  [{now - t_launch:6.1f}s] all {len(runs)} run(s) succeeded", flush=True)
        if bf["status"] in ui.BACKFILL_DONE:
            marks["backfill_done"] = now
            marks["runs_done"] = marks.get("runs_done", now)
            marks["backfill"] = bf
            return marks
        if now >= next_progress:
            next_progress = now + 30.0
            done = sum(1 for _ in data_dir.glob("event_windows/symbol=*/event=*/quotes.parquet"))
            by_status = dict(Counter(r["status"] for r in runs))
            print(
                f"  [{now - t_launch:6.1f}s] {bf['status']}, runs {by_status}, events on disk {done:,}",
                flush=True,
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"backfill not done in {timeout:.0f}s: {bf['status']} {runs}")
        time.sleep(1.0)


VARIANT = """# Written by benchmarks/backfill_bench.py: the Definitions with another backfill policy.
import warnings

import dagster as dg

from smallcaps_ingest import definitions as d

warnings.simplefilter("ignore")
POLICY = dg.BackfillPolicy.multi_run({n})
defs = dg.Definitions(
    assets=[a.with_attributes(backfill_policy=POLICY) if a.key == dg.AssetKey("event_windows") else a
            for a in d.defs.assets],
    asset_checks=d.defs.asset_checks,
    jobs=d.defs.jobs,
    resources=d.defs.resources,
)
"""


def code_location(policy: str, root: Path) -> tuple[list[str], str]:
    """``dagster dev`` arguments for the project as it is (``single``) or with ``multi_run:N``."""
    if policy == "single":
        return ["-m", "smallcaps_ingest"], "BackfillPolicy.single_run() (the project's)"
    kind, _, n = policy.partition(":")
    if kind != "multi_run" or not n.isdigit() or int(n) < 1:
        raise SystemExit(f"--policy {policy!r}: expected single or multi_run:N")
    path = root / "variant_defs.py"
    path.write_text(VARIANT.format(n=int(n)))
    return ["-f", str(path)], f"BackfillPolicy.multi_run({int(n)}) (what-if variant, {path.name})"


# ----------------------------------------------------------------------------------------------
# Reading the instance afterwards
# ----------------------------------------------------------------------------------------------
def _q(xs: Sequence[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def analyse_instance(
    home: Path, backfill_id: str, symbols: Sequence[str], pg_url: str | None = None
) -> dict[str, Any]:
    import dagster as dg
    
    os.environ["DAGSTER_HOME"] = str(home)  # dagster.yaml's storage reads it
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        records = instance.get_run_records(dg.RunsFilter.for_backfill(backfill_id))
        runs = []
        per_partition: dict[str, dict[str, Any]] = defaultdict(dict)
        type_marks: dict[str, list[float]] = defaultdict(list)
        step_marks: dict[tuple[str, str], list[float]] = defaultdict(list)
        seq: list[tuple[float, str, str | None, str]] = []  # (ts, type, partition, message)
        failed_checks: Counter[str] = Counter()
        for rec in sorted(records, key=lambda r: r.create_timestamp.timestamp()):
            run = rec.dagster_run
            runs.append(
                {
                    "id": run.run_id,
                    "status": run.status.value,
                    "created": rec.create_timestamp.timestamp(),
                    "start": rec.start_time,
                    "end": rec.end_time,
                    "range": _run_range(run.tags),
                }
            )
            for e in instance.all_logs(run.run_id):
                kind = e.dagster_event.event_type_value if e.dagster_event else LOG
                type_marks[kind].append(e.timestamp)
                if e.step_key:
                    step_marks[(e.step_key, kind)].append(e.timestamp)
                partition = None
                if kind == MAT:
                    m = e.dagster_event.event_specific_data.materialization  # type: ignore[union-attr]
                    partition = m.partition
                    md = {k: v.value for k, v in m.metadata.items()}
                    if md.get("checkpoint"):  # a range run's mid-run record of a complete symbol
                        per_partition[partition]["ckpt_ts"] = e.timestamp
                    else:  # the full record (Dagster's, with provenance, when the step succeeds)
                        per_partition[partition].update(
                            mat_ts=e.timestamp,
                            run_id=run.run_id,
                            seconds=float(md.get("seconds", 0.0)),
                            requests=int(md.get("requests", 0)),
                            budget_wait_s=float(md.get("budget_wait_s", 0.0)),
                        )
                elif kind == CHK:
                    ev = e.dagster_event.event_specific_data  # type: ignore[union-attr]
                    partition = ev.partition
                    per_partition[partition].setdefault("chk_ts", []).append(e.timestamp)
                    per_partition[partition].setdefault("chk_passed", []).append(ev.passed)
                    if not ev.passed:
                        failed_checks[ev.check_name] += 1
                elif (
                    kind == LOG
                    and e.user_message
                    and ": " in e.user_message
                    and "events complete" in e.user_message
                ):
                    partition = e.user_message.split(":", 1)[0]
                    per_partition[partition]["log_ts"] = e.timestamp
                seq.append((e.timestamp, kind, partition, e.user_message or ""))
        queries = time_queries(instance, symbols)
        materialized = instance.get_materialized_partitions(dg.AssetKey(ASSET))
    finally:
        instance.dispose()
    return {
        "runs": runs,
        "per_partition": dict(per_partition),
        "type_marks": dict(type_marks),
        "step_marks": dict(step_marks),
        "seq": sorted(seq),
        "queries": queries,
        "materialized": len(set(materialized) & set(symbols)),
        "failed_checks": dict(failed_checks),
        "files": instance_files(home, pg_url),
    }


def instance_files(home: Path, pg_url: str | None = None) -> list[tuple[str, float]]:
    """The instance's SQLite files and their sizes (MB), biggest first; on Postgres the database."""
    if pg_url:
        return [(f"postgres database {pg_url.rsplit('/', 1)[1]}", database_mb(pg_url))]
    files = [(str(f.relative_to(home)), f.stat().st_size / 1e6) for f in home.rglob("*.db*") if f.is_file()]
    return sorted(files, key=lambda x: -x[1])


def full_job(
    n: int, t_launch: float, engine_start: float, run_end: float, backfill_done: float, info: dict[str, Any]
) -> None:
    """What of this backfill's orchestration the users' whole job would not overlap with its fetch.

    Here each partition is one tiny event (~0.02 s of fetch), so the step's writes as symbols
    complete (log line, checkpoint, and since D18 the checks' evaluations) trail the fetch. In the
    whole job (FULL_JOB_EVENTS at FULL_JOB_REQ_PER_EVENT, FULL_JOB_RPS) each symbol takes seconds to
    fetch, so those writes overlap it as long as one partition's writes take less than that. What
    stays outside the fetch whatever its length: launch -> first request (with Dagster's planned
    events, one per partition), Dagster's records of every partition at step end through RUN_SUCCESS
    (with the check step), and the backfill's completion. Per-partition parts are scaled to
    FULL_JOB_SYMBOLS when the bench ran fewer partitions."""
    pp, seq = info["per_partition"], info["seq"]
    full = [p["mat_ts"] for p in pp.values() if "mat_ts" in p]
    if not full:
        return
    first_full = min(full)
    in_step = [ts for ts, kind, _, _ in seq if kind in (MAT, CHK, LOG) and ts < first_full]
    per_partition_s = (max(in_step) - min(in_step)) / n if len(in_step) > 1 else 0.0
    fetch_s = FULL_JOB_EVENTS * FULL_JOB_REQ_PER_EVENT / FULL_JOB_RPS
    per_symbol_fetch_s = fetch_s / FULL_JOB_SYMBOLS
    scale = FULL_JOB_SYMBOLS / n  # the records at step end grow with the partitions
    after = [ts for ts, kind, _, _ in seq if kind == CHK and ts >= first_full]
    planned = info["type_marks"].get("ASSET_MATERIALIZATION_PLANNED", [])
    planned_s = (max(planned) - min(planned)) if planned else 0.0  # one event per partition at launch
    rows = [
        ("launch -> first request", engine_start - t_launch),
        ("  of which the planned events, one per partition", planned_s),
        ("the step's writes of one partition (overlap while < one symbol's fetch)", per_partition_s),
        ("Dagster's records of every partition (first -> last)", max(full) - first_full),
        ("  check evaluations after them (the check step)", (max(after) - first_full) if after else 0.0),
        ("last of Dagster's records -> RUN_SUCCESS", run_end - max(full)),
        ("RUN_SUCCESS -> backfill COMPLETED_SUCCESS", backfill_done - run_end),
    ]
    outside = ((engine_start - t_launch) + (scale - 1) * planned_s + per_partition_s
               + (max(full) - first_full) * scale + (run_end - max(full)) + (backfill_done - run_end))
    label = f"not overlapped with the fetch, whole job (planned events and Dagster's records x {scale:g})"
    rows.append((label, outside))
    print()
    title = (f"The users' whole job: {FULL_JOB_EVENTS:,} events x {FULL_JOB_REQ_PER_EVENT} req at "
             f"{FULL_JOB_RPS:g} req/s = {fetch_s:,.0f} s of fetch, {FULL_JOB_SYMBOLS:,} symbols "
             f"({per_symbol_fetch_s:.2f} s each)")
    print(table(["figure", "seconds"], rows, title=title))
    verdict = "met" if outside < 0.05 * fetch_s and per_partition_s < per_symbol_fetch_s else "NOT met"
    print(f"orchestration outside the fetch {outside:.0f} s = {outside / fetch_s * 100:.1f} % of the fetch "
          f"(goal < 5 % = {0.05 * fetch_s:.0f} s): {verdict}")


def _run_range(tags: Mapping[str, str]) -> str:
    if "dagster/partition" in tags:
        return tags["dagster/partition"]
    return (
        f"{tags.get('dagster/asset_partition_range_start')}...{tags.get('dagster/asset_partition_range_end')}"
    )


def time_queries(instance: Any, symbols: Sequence[str], sample: int = 200) -> dict[str, float]:
    """The instance read Dagster makes per partition for a check result (its latest materialization),
    alone, on the finished instance (ms each). The range run's step makes none of its own."""
    import dagster as dg

    picks = list(symbols)[:: max(1, len(symbols) // sample)][:sample]
    t = time.perf_counter()
    for s in picks:
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(ASSET), asset_partitions=[s]), limit=1
        )
    return {"latest materialization of a partition (1 read)": (time.perf_counter() - t) / len(picks) * 1000}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM runs the finally blocks (cleanup) like Ctrl-C does."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, default=1600, help="partitions to backfill (one event each)")
    ap.add_argument("--rps", type=float, default=100.0, help="POLYGON_MAX_RPS for both runs")
    ap.add_argument("--workers", type=int, default=12, help="POLYGON_WORKERS for both runs")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--jitter-ms", type=float, default=10.0)
    ap.add_argument("--window-s", type=float, default=45.0, help="event window: 1/3 before, 2/3 after")
    ap.add_argument("--timeout", type=float, default=1800.0, help="for the backfill, seconds")
    ap.add_argument("--skip-direct", action="store_true", help="only the Dagster backfill")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the Dagster processes "
        "(e.g. DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS=1)",
    )
    ap.add_argument(
        "--policy",
        default="single",
        help="single (the project's BackfillPolicy.single_run()) or multi_run:N, a what-if variant "
        "loaded from a generated definitions file (assets.py is not changed)",
    )
    ap.add_argument(
        "--storage",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the instance: dagster_home/dagster.yaml (SQLite files) or deploy/dagster.yaml on a "
        "database of its own on the local PostgreSQL, 127.0.0.1:5432 (created, dropped afterwards)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (path printed)")
    args = ap.parse_args()

    t_all = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="backfill_bench_"))
    print(f"load average at start: {load_average()}; work dir {root}")
    before_min, after_min = args.window_s / 3 / 60, args.window_s * 2 / 3 / 60
    events_path = root / "events.parquet"
    make_events(args.symbols).write_parquet(events_path)
    manifest_df, work = build_work(events_path, before_min, after_min)
    symbols = sorted(work)
    windows = [w for ws in work.values() for w in ws]
    print(
        f"{len(symbols):,} symbols, {len(windows):,} events, windows {args.window_s:g} s "
        f"({before_min * 60:g} s before, {after_min * 60:g} s after); budget {args.rps:g} req/s, "
        f"{args.workers} workers; simulator latency {args.latency_ms:g} +- {args.jitter_ms:g} ms"
    )

    sim: SimHost | None = None
    dev: DagsterDev | None = None
    stack = contextlib.ExitStack()
    try:
        with sigterm_as_exit():
            pg_url = stack.enter_context(pg_database()) if args.storage == "postgres" else None
            sim = SimHost(latency_ms=args.latency_ms, latency_jitter_ms=args.jitter_ms)
            rows, cpu, _, _ = sim.warm(
                [Event(s, w.event_id, w.start_ns, w.end_ns) for s, ws in work.items() for w in ws]
            )
            print(f"simulator {sim.base_url} (pid {sim.pid}): warmed {rows:,} ticks in {cpu:.1f}s CPU")

            direct = None
            if not args.skip_direct:
                sim.reset()
                print("\n[direct] FetchEngine without Dagster ...", flush=True)
                direct = direct_run(sim.base_url, work, args.rps, args.workers, root)
                direct["sim"] = sim.counters()
                print(
                    f"  {direct['seconds']:.1f}s, {direct['requests']:,} requests; checks from disk "
                    f"{direct['checks_s']:.1f}s",
                    flush=True,
                )

            home, data = root / "dagster_home", root / "data"
            home.mkdir()
            data.mkdir()
            config = "deploy" if pg_url else "dagster_home"
            shutil.copy(ROOT / config / "dagster.yaml", home / "dagster.yaml")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "SMALLCAPS_"))}
            env.update(
                DAGSTER_HOME=str(home),
                SMALLCAPS_DATA_DIR=str(data),
                SMALLCAPS_EVENTS=str(events_path),
                POLYGON_BASE_URL=sim.base_url,
                POLYGON_API_KEY=API_KEY,
                POLYGON_MAX_RPS=str(args.rps),
                POLYGON_WORKERS=str(args.workers),
                PYTHONUNBUFFERED="1",
            )
            if pg_url:
                env["DAGSTER_PG_URL"] = os.environ["DAGSTER_PG_URL"] = pg_url  # analyse_instance's too
                print(f"instance storage: postgres ({pg_url})")
            extra = dict(kv.split("=", 1) for kv in args.env)
            env.update(extra)
            if extra:
                print(f"extra environment for Dagster: {extra}")

            print("\n[dagster] materializing the manifest (CLI) ...", flush=True)
            cfg = {
                "ops": {"manifest": {"config": {"minutes_before": before_min, "minutes_after": after_min}}}
            }
            t = time.monotonic()
            with open(root / "manifest.log", "wb") as log:
                rc = subprocess.run(
                    [
                        str(BIN / "dagster"),
                        "asset",
                        "materialize",
                        "-m",
                        "smallcaps_ingest",
                        "--select",
                        "manifest",
                        "--config-json",
                        json.dumps(cfg),
                    ],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=600,
                ).returncode
            manifest_s = time.monotonic() - t
            if rc != 0:
                raise RuntimeError(f"manifest failed ({rc}):\n{tail(root / 'manifest.log')}")
            print(f"  {manifest_s:.1f}s", flush=True)

            t = time.monotonic()
            target, policy_label = code_location(args.policy, root)
            print(f"  backfill policy: {policy_label}")
            dev = DagsterDev(BIN, env, root / "dagster_dev.log", cwd=ROOT, target=target)
            dev.wait_ready(timeout=180)
            ready_s = time.monotonic() - t
            print(f"  dagster dev ready at {dev.url} in {ready_s:.1f}s; launching the backfill", flush=True)

            sim.reset()
            t_launch = time.time()
            backfill_id = launch_backfill(dev, symbols)
            launch_s = time.time() - t_launch
            marks = wait_backfill(dev, backfill_id, t_launch, args.timeout, data)
            counters = sim.counters()
            log = sim.log()
            dev.stop()
            dev = None
            sim.stop()
            sim = None

            info = analyse_instance(home, backfill_id, symbols, pg_url)
            report(
                args,
                symbols,
                direct,
                manifest_s,
                ready_s,
                launch_s,
                t_launch,
                marks,
                counters,
                log,
                info,
                policy_label,
            )
    finally:
        if dev is not None:
            dev.stop()
        if sim is not None:
            sim.stop()
        stack.close()  # drops the Postgres database
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average at end: {load_average()}; total {time.monotonic() - t_all:.0f} s")


def report(
    args: argparse.Namespace,
    symbols: Sequence[str],
    direct: dict[str, Any] | None,
    manifest_s: float,
    ready_s: float,
    launch_s: float,
    t_launch: float,
    marks: dict[str, Any],
    counters: dict[str, Any],
    log: Sequence[Any],
    info: dict[str, Any],
    policy_label: str,
) -> None:
    n = len(symbols)
    pp = info["per_partition"]
    tm = info["type_marks"]
    runs = info["runs"]
    mono_to_wall = time.time() - time.monotonic()

    def rel(ts: float | None) -> float:
        return float("nan") if ts is None else ts - t_launch

    # -- the engine's fetch, from the simulator's request log: it serves only this backfill, so
    # the first and last arrivals bound the engine's requests (the materializations' ``seconds``
    # is each symbol's own time from its first request, not the engine's)
    arrivals = sorted(r[0] + mono_to_wall for r in log)
    engine_start = arrivals[0] if arrivals else float("nan")
    engine_end = arrivals[-1] if arrivals else float("nan")
    engine_fetch_s = engine_end - engine_start if arrivals else float("nan")
    req_meta = sum(p.get("requests", 0) for p in pp.values())
    total = marks["backfill_done"] - t_launch
    work_done = marks["runs_done"] - t_launch
    run_end = max((r["end"] or 0.0) for r in runs)

    print(f"\n== Backfill of {n:,} event_windows partitions through dagster dev (daemon), {policy_label} ==")
    print(
        f"(manifest CLI {manifest_s:.1f}s; dagster dev ready {ready_s:.1f}s; launch mutation "
        f"{launch_s:.2f}s; not counted below)"
    )
    print(f"runs the daemon created: {len(runs)}")
    for r in runs:
        print(
            f"  run {r['id'][:8]} {r['status']} range {r['range']}: created {rel(r['created']):.1f}s, "
            f"start {rel(r['start']):.1f}s, end {rel(r['end']):.1f}s after launch "
            f"(run {(r['end'] or 0) - (r['start'] or 0):.1f}s)"
        )
    print(
        f"partitions materialized: {info['materialized']:,} / {n:,}; materialization events "
        f"{len(tm.get(MAT, [])):,}, check evaluations {len(tm.get(CHK, [])):,} "
        f"(failed {info['failed_checks'] or 0}), "
        f"log lines {len(tm.get(LOG, [])):,}, events in the run's log {sum(len(v) for v in tm.values()):,}"
    )

    # -- timeline
    def first(kind: str) -> float | None:
        return min(tm[kind]) if tm.get(kind) else None

    def last(kind: str) -> float | None:
        return max(tm[kind]) if tm.get(kind) else None

    def step_first(kind: str, step: str = ASSET) -> float | None:
        v = info["step_marks"].get((step, kind))
        return min(v) if v else None

    last_record = max(tm.get(CHK, []) + tm.get(MAT, []), default=None)
    timeline = [
        ("backfill launched (GraphQL)", 0.0),
        ("run created by the backfill daemon", rel(min(r["created"] for r in runs))),
        (
            "  planned events (ASSET_MATERIALIZATION_PLANNED) from",
            rel(first("ASSET_MATERIALIZATION_PLANNED")),
        ),
        ("  planned events to", rel(last("ASSET_MATERIALIZATION_PLANNED"))),
        ("run enqueued (PIPELINE_ENQUEUED)", rel(first("PIPELINE_ENQUEUED"))),
        ("run launched by the queue daemon (STARTING)", rel(first("PIPELINE_STARTING"))),
        ("run worker process: RUN_START", rel(first("PIPELINE_START"))),
        ("step process: STEP_START", rel(step_first("STEP_START"))),
        ("engine start: first request at the simulator", rel(engine_start)),
        ("first partition recorded (materialization)", rel(first(MAT))),
        ("engine end: last request at the simulator", rel(engine_end)),
        ("last materialization / check evaluation", rel(last_record)),
        ("STEP_SUCCESS", rel(step_first("STEP_SUCCESS"))),
        ("RUN_SUCCESS (run end)", rel(run_end)),
        ("all runs SUCCESS (seen by polling)", work_done),
        ("backfill COMPLETED_SUCCESS (seen by polling)", total),
    ]
    print()
    print(table(["event", "s after launch"], timeline, title="Timeline"))
    others = sorted(
        (k, len(v), rel(min(v)), rel(max(v)))
        for k, v in tm.items()
        if k not in (MAT, CHK, LOG) and len(v) > 0
    )
    print()
    print(
        table(
            ["event type", "count", "first s", "last s"],
            [(k, c, a, b) for k, c, a, b in others],
            title="Other events in the run's log",
        )
    )

    # -- figures
    reqs = counters["total"]
    served = sum(counters["requests"]["trades"].values()) + sum(counters["requests"]["quotes"].values())
    span = (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")
    overhead = total - engine_fetch_s
    overhead_work = work_done - engine_fetch_s
    rows = [
        ("wall: launch -> backfill COMPLETED_SUCCESS", total, total / n * 1000),
        ("wall: launch -> run SUCCESS (work done)", work_done, work_done / n * 1000),
        (
            "fetch time in the backfill (first -> last request at the simulator)",
            engine_fetch_s,
            engine_fetch_s / n * 1000,
        ),
        ("orchestration overhead = backfill total - fetch", overhead, overhead / n * 1000),
        ("orchestration overhead = run SUCCESS - fetch", overhead_work, overhead_work / n * 1000),
        ("  launch -> engine start", engine_start - t_launch, (engine_start - t_launch) / n * 1000),
        (
            "  engine end -> last partition recorded",
            (last_record or engine_end) - engine_end,
            ((last_record or engine_end) - engine_end) / n * 1000,
        ),
        (
            "  last recorded -> RUN_SUCCESS",
            run_end - (last_record or run_end),
            (run_end - (last_record or run_end)) / n * 1000,
        ),
        (
            "  RUN_SUCCESS -> backfill COMPLETED_SUCCESS",
            marks["backfill_done"] - run_end,
            (marks["backfill_done"] - run_end) / n * 1000,
        ),
    ]
    if direct is not None:
        rows.insert(
            3,
            ("fetch time, direct FetchEngine (no Dagster)", direct["seconds"], direct["seconds"] / n * 1000),
        )
        rows.insert(
            4,
            (
                "  checks from disk, direct (check.evaluate_symbol)",
                direct["checks_s"],
                direct["checks_s"] / n * 1000,
            ),
        )
        rows.append(("backfill total / direct fetch (x)", total / direct["seconds"], float("nan")))
    print()
    print(table(["figure", "seconds", "ms / partition"], rows, title="Wall time (noisy: shared 2-core host)"))
    full_job(n, t_launch, engine_start, run_end, marks["backfill_done"], info)

    print()
    req_rows = [
        (
            "dagster backfill",
            reqs,
            served,
            counters["faults"].get("429", 0),
            req_meta,
            sum(p.get("budget_wait_s", 0.0) for p in pp.values()),
            reqs / span if span and span > 0 else float("nan"),
        )
    ]
    if direct is not None:
        d_counts = direct["sim"]
        req_rows.append(
            (
                "direct FetchEngine",
                d_counts["total"],
                direct["requests"],
                d_counts["faults"].get("429", 0),
                direct["requests"],
                direct["budget_wait_s"],
                direct["requests"] / direct["seconds"],
            )
        )
    print(
        table(
            [
                "run",
                "requests (sim)",
                "served/engine",
                "429s",
                "requests (metadata)",
                "budget wait s",
                "req/s",
            ],
            req_rows,
            title="Requests",
        )
    )

    # -- per-partition recording, from the gaps between the step's events
    gaps: dict[str, list[float]] = defaultdict(list)
    for p in pp.values():
        chk = sorted(p.get("chk_ts", []))
        if "log_ts" in p and "ckpt_ts" in p:
            gaps["log line -> checkpoint (one write)"].append(p["ckpt_ts"] - p["log_ts"])
        if "log_ts" in p and "mat_ts" in p and "ckpt_ts" not in p:
            gaps["log line -> materialization (one write)"].append(p["mat_ts"] - p["log_ts"])
        if "mat_ts" in p and chk:
            gaps["full record -> 1st check (disk checks)"].append(chk[0] - p["mat_ts"])
        if len(chk) > 1:
            gaps["1st -> 8th check evaluation (7 writes)"].append(chk[-1] - chk[0])
        if "log_ts" in p and chk:
            gaps["log line -> 8th check (whole recording)"].append(chk[-1] - p["log_ts"])
    rec_rows = [
        (
            k,
            len(v),
            _q(v, 0.5) * 1000,
            statistics.fmean(v) * 1000 if v else float("nan"),
            _q(v, 0.9) * 1000,
            max(v, default=float("nan")) * 1000,
            sum(v),
        )
        for k, v in gaps.items()
    ]
    print()
    print(
        table(
            ["per partition", "n", "p50 ms", "mean ms", "p90 ms", "max ms", "sum s"],
            rec_rows,
            title="Recording per partition (event timestamps written by the step process)",
        )
    )

    # events written per partition and the time per event write
    seq = info["seq"]
    step_seq = [(ts, k) for ts, k, _, _ in seq if k in (MAT, CHK, LOG)]
    inter = [b[0] - a[0] for a, b in zip(step_seq, step_seq[1:], strict=False) if b[1] == CHK and a[1] == CHK]
    print(
        f"\nconsecutive check-evaluation events: p50 {_q(inter, 0.5) * 1000:.1f} ms, mean "
        f"{(statistics.fmean(inter) if inter else float('nan')) * 1000:.1f} ms apart (~ one event write each)"
    )
    k = 5
    parts = [inter[i * len(inter) // k : (i + 1) * len(inter) // k] for i in range(k)]
    print(
        "  p50 by fifth of the run (does the write get slower as the instance grows?): "
        + ", ".join(f"{_q(x, 0.5) * 1000:.1f}" for x in parts)
        + " ms"
    )
    if last_record and first(MAT):
        rec_span = last_record - (first(LOG) or first(MAT) or 0.0)
        print(
            f"recording loop: {n:,} partitions from first log line to last record in {rec_span:.1f}s "
            f"= {rec_span / n * 1000:.1f} ms/partition; the engine finished the symbols at "
            f"{engine_fetch_s / n * 1000:.1f} ms/partition"
        )
    print()
    print(
        table(
            ["instance read, alone on the finished instance", "ms each"],
            info["queries"].items(),
            title=f"Per-partition instance reads of event_windows ({args.storage}, no concurrent writer)",
        )
    )
    files = info["files"]
    print(
        f"\ninstance storage ({args.storage}): {sum(mb for _, mb in files):.1f} MB in {len(files)} "
        "file(s) / database; biggest: "
        + ", ".join(f"{name} {mb:.1f} MB" for name, mb in files[:3])
    )
    if direct is not None:
        print(f"direct run: checks failed {direct['checks_failed_by_name'] or 0}")


if __name__ == "__main__":
    main()
