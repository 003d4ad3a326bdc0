"""Time ``smallcaps-ingest status`` (from the instance) and ``status --verify`` (a walk of the disk)
on a generated tree of N events (default 100,000).

    python benchmarks/status_bench.py                                   # 100,000 events
    python benchmarks/status_bench.py --events 572850 --per-symbol 354  # the full data set's size

The tree: ``event_windows/symbol=SYM/event=EVENT_ID/{trades,quotes}.parquet`` with ``--per-symbol``
events per symbol (default 150). Files are tiny *real* parquet files by default (the bytes of an
empty trades/quotes window written once by ``store.write_event`` and copied to every path), or
zero-byte placeholders with ``--placeholders`` (--verify only looks at names and sizes, so both time
the same syscalls; placeholders save disk). Known defects are planted: 1% of the manifest's events
are missing, 0.2% partial (trades only), 0.05% carry a ``*.tmp*`` orphan next to complete files.

Next to it: a manifest parquet of the same events (the real manifest's columns) and a Dagster
instance in a temporary DAGSTER_HOME holding the "symbols" partitions, a manifest materialization
(events, symbols) and one runless ``event_windows`` materialization per symbol with the real
metadata keys, its counts the tree's (events_total, events_complete, bytes). Then the CLI runs in a
fresh process each time, as a user would run it; the page cache is warm (the tree was just written).

Timed, each in a fresh process: status with no lifetime-sums cache (``_state/status_cache.json``
removed: the first status on a tree), status again (the cache read), ``status --verify`` and
``status --no-instance`` (``--quick``: the first two only). Every run's counts are checked against
the generated tree's (the default's: complete events and bytes; partial events count as missing).

    python benchmarks/status_bench.py --events 100000 572850 --keep   # then --reuse to re-time
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import polars as pl

from smallcaps_ingest.core import shape, store

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("smallcaps-ingest")
T0_NS = 1_704_205_800_000_000_000  # 2024-01-02 14:30 UTC
MIN_NS = 60_000_000_000


def event_ids(n: int, per_symbol: int) -> pl.DataFrame:
    """A manifest with the real columns; ids shaped like manifest.make_event_id's."""
    i = pl.int_range(0, n, eager=True)
    ts = T0_NS + (i // per_symbol) * 7 * MIN_NS + (i % per_symbol) * 1440 * MIN_NS
    df = pl.DataFrame({"i": i, "ns": ts}).with_columns(
        symbol=pl.format("S{}", (pl.col("i") // per_symbol).cast(pl.String).str.zfill(5)),
        timestamp=pl.col("ns").cast(pl.Datetime("ns", "UTC")),
    )
    return df.with_columns(
        event_id=pl.format(
            "{}_volume_spike_{}_{}",
            pl.col("symbol"),
            pl.col("timestamp").dt.strftime("%Y%m%d_%H%M%S"),
            (pl.col("i") * 2654435761 % (1 << 32)).cast(pl.String).str.zfill(10).str.slice(2, 8),
        ),
        event_type=pl.lit("volume_spike"),
        ts_start=(pl.col("ns") - 3 * MIN_NS).cast(pl.Datetime("ns", "UTC")),
        ts_end=(pl.col("ns") + 7 * MIN_NS).cast(pl.Datetime("ns", "UTC")),
        session=pl.lit("RTH"),
    ).select("event_id", "symbol", "event_type", "timestamp", "ts_start", "ts_end", "session")


def generate(data_dir: Path, n: int, per_symbol: int, placeholders: bool) -> dict[str, int]:
    manifest = event_ids(n, per_symbol)
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_parquet(data_dir / "manifest.parquet")
    if placeholders:
        tbytes = qbytes = b""
    else:
        with tempfile.TemporaryDirectory() as tmp:
            store.write_event(
                tmp,
                "X",
                "E",
                pl.DataFrame(schema=shape.TRADES_SCHEMA),
                pl.DataFrame(schema=shape.QUOTES_SCHEMA),
            )
            d = store.event_dir(tmp, "X", "E")
            tbytes, qbytes = (d / "trades.parquet").read_bytes(), (d / "quotes.parquet").read_bytes()
    counts: dict = {"complete": 0, "partial": 0, "missing": 0, "orphans": 0, "files": 0, "bytes": 0}
    per_symbol_done: dict[str, int] = {}
    per_symbol_bytes: dict[str, int] = {}
    root = store.windows_root(data_dir)
    last_sym = None
    for k, (sym, eid) in enumerate(
        zip(manifest["symbol"].to_list(), manifest["event_id"].to_list(), strict=True)
    ):
        if sym != last_sym:
            sdir = root / f"symbol={sym}"
            sdir.mkdir(parents=True, exist_ok=True)
            last_sym = sym
        if k % 100 == 37:  # 1% missing
            counts["missing"] += 1
            continue
        ed = f"{sdir}/event={eid}"
        os.mkdir(ed)
        with open(f"{ed}/trades.parquet", "wb") as fh:
            fh.write(tbytes)
        counts["files"] += 1
        counts["bytes"] += len(tbytes)
        per_symbol_bytes[sym] = per_symbol_bytes.get(sym, 0) + len(tbytes)
        if k % 500 == 11:  # 0.2% partial
            counts["partial"] += 1
            continue
        with open(f"{ed}/quotes.parquet", "wb") as fh:
            fh.write(qbytes)
        counts["files"] += 1
        counts["bytes"] += len(qbytes)
        per_symbol_bytes[sym] += len(qbytes)
        counts["complete"] += 1
        per_symbol_done[sym] = per_symbol_done.get(sym, 0) + 1
        if k % 2000 == 5:  # 0.05% orphans
            with open(f"{ed}/trades.parquet.tmp.4242.{k}", "wb") as fh:
                fh.write(b"interrupted")
            counts["orphans"] += 1
    counts["symbols"] = manifest["symbol"].n_unique()
    counts["per_symbol"] = {s: [per_symbol_done.get(s, 0), per_symbol_bytes.get(s, 0)]
                            for s in manifest["symbol"].unique().to_list()}
    return counts


def fill_instance(home: Path, symbols: list[str], per_symbol: int, truth: dict) -> float:
    t = time.perf_counter()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions("symbols", symbols)
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="manifest", metadata={"events": truth["events"], "symbols": truth["symbols"]}
        )
    )
    for s in symbols:
        done, size = truth["per_symbol"][s]
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key="event_windows",
                partition=s,
                metadata={
                    "events_total": per_symbol,
                    "events_complete": done,
                    "events_skipped": 0,
                    "events_written": per_symbol,
                    "events_empty": 2,
                    "requests": 3 * per_symbol,
                    "requests_per_event": 3.0,
                    "pages": 3 * per_symbol,
                    "429s": 1,
                    "retries": 2,
                    "rows": 1000,
                    "rows_raw": 2000,
                    "bytes": size,
                    "bytes_downloaded": 900_000,
                    "events_per_min": 600.0,
                    "budget_wait_s": 0.5,
                    "errors_by_type": dg.MetadataValue.json({"429": 1, "5xx": 1}),
                    "seconds": 15.0,
                },
            )
        )
    instance.dispose()
    return time.perf_counter() - t


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_status(data_dir: Path, env: dict[str, str], *extra: str) -> tuple[float, dict]:
    """(wall seconds, the --json dict with "cpu_s" added: user+sys of the CLI process)."""
    cpu = _children_cpu()
    t = time.perf_counter()
    proc = subprocess.run(
        [str(CLI), "status", "--json", "--data-dir", str(data_dir), *extra],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    wall = time.perf_counter() - t
    out = json.loads(proc.stdout)
    out["cpu_s"] = _children_cpu() - cpu
    return wall, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--events", type=int, nargs="+", default=[100_000], help="tree sizes to time (e.g. 100000 572850)"
    )
    ap.add_argument("--per-symbol", type=int, default=150)
    ap.add_argument("--placeholders", action="store_true", help="zero-byte files instead of tiny real ones")
    ap.add_argument(
        "--materializations",
        type=int,
        default=None,
        help="runless materializations in the instance (default: one per symbol)",
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="where to build (default benchmarks/out/status_N)")
    ap.add_argument("--keep", action="store_true", help="keep the generated tree and instance")
    ap.add_argument("--reuse", action="store_true", help="time a tree kept by an earlier --keep run")
    ap.add_argument("--quick", action="store_true", help="only the default status, cold and warm")
    args = ap.parse_args()
    summary: list[str] = []
    for n in args.events:
        summary += bench_one(n, args)
    print("\nsummary (wall seconds; median / best of", args.runs, "runs)")
    for line in summary:
        print("  " + line)


def bench_one(n: int, args: argparse.Namespace) -> list[str]:
    base = (args.dir / f"status_{n}") if args.dir else ROOT / "benchmarks" / "out" / f"status_{n}"
    data_dir, home = base / "data", base / "dagster_home"
    truth_file = base / "truth.json"
    if args.reuse and truth_file.is_file():
        truth = json.loads(truth_file.read_text())
        print(f"\nreusing the tree and instance under {base}")
        return time_status(n, data_dir, home, truth, args)
    if base.exists():
        shutil.rmtree(base)
    home.mkdir(parents=True)
    print(
        f"\ngenerating {n:,} events ({args.per_symbol}/symbol, "
        f"{'zero-byte placeholders' if args.placeholders else 'tiny real parquet files'}) under {base}"
    )
    t = time.perf_counter()
    truth = generate(data_dir, n, args.per_symbol, args.placeholders)
    truth["events"] = n
    print(f"  tree: {time.perf_counter() - t:.1f}s  "
          f"{ {k: v for k, v in truth.items() if k != 'per_symbol'} }")
    symbols = [f"S{i:05d}" for i in range(truth["symbols"])]
    n_mat = truth["symbols"] if args.materializations is None else args.materializations
    secs = fill_instance(home, symbols[:n_mat] if n_mat <= len(symbols) else symbols, args.per_symbol, truth)
    print(
        f"  instance: {len(symbols):,} partitions, {min(n_mat, len(symbols)):,} materializations "
        f"in {secs:.1f}s"
    )
    truth_file.write_text(json.dumps(truth))
    out = time_status(n, data_dir, home, truth, args)
    if not args.keep:
        shutil.rmtree(base)
    return out


# parts of the --json output that do not depend on the clock (throughput and API figures do)
STABLE = ("manifest", "events", "symbols", "disk", "instance", "errors", "lifetime")


def clear_cache(data_dir: Path) -> None:
    """As if status had never run on this tree: no lifetime-sums cache."""
    (data_dir / "_state" / "status_cache.json").unlink(missing_ok=True)


def check_counts(out: dict, truth: dict, verify: bool) -> None:
    ev, dk = out["events"], out["disk"]
    assert ev["done"] == truth["complete"], (ev, truth)
    if verify:
        assert ev["partial"] == truth["partial"] and ev["missing"] == truth["missing"], (ev, truth)
        assert dk["tmp_orphans"] == truth["orphans"] and dk["files"] == truth["files"], (dk, truth)
    else:  # the instance knows complete events: a partial one counts as missing
        assert ev["missing"] == truth["missing"] + truth["partial"], (ev, truth)
    assert dk["bytes"] == truth["bytes"], (dk, truth)


def time_status(
    n: int, data_dir: Path, home: Path, truth: dict, args: argparse.Namespace
) -> list[str]:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    variants: dict[str, tuple[tuple[str, ...], bool]] = {
        "status, no lifetime cache (first run on a tree)": ((), True),
        "status (from the instance)": ((), False),
    }
    if not args.quick:
        variants |= {
            "status --verify (walks the disk)": (("--verify",), False),
            "status --no-instance (walks the disk)": (("--no-instance",), False),
        }
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n{n:,} events, {truth['symbols']:,} partitions; {os.cpu_count()} CPUs, load average {load}; "
        f"{args.runs} runs each, warm page cache"
    )
    print(f"{'variant':50s} {'median':>7s} {'best':>7s} {'cpu med':>8s}   timings of the median run (s)")
    summary = []
    stable_ref: dict | None = None
    for label, (extra, cold) in variants.items():
        runs = []
        for _ in range(args.runs):
            if cold:
                clear_cache(data_dir)
            wall, out = run_status(data_dir, env, *extra)
            check_counts(out, truth, verify=bool(extra))
            if not extra:
                stable = {k: out[k] for k in STABLE}
                stable_ref = stable_ref or stable
                assert stable == stable_ref, label  # cold or warm: the same answer
            runs.append((wall, out))
        walls = [w for w, _ in runs]
        med = sorted(runs, key=lambda r: r[0])[len(runs) // 2][1]["timings_s"]
        parts = ", ".join(f"{k} {v:.3f}" for k, v in med.items())
        cpu = statistics.median(r["cpu_s"] for _, r in runs)
        print(f"{label:50s} {statistics.median(walls):7.3f} {min(walls):7.3f} {cpu:8.3f}   {parts}")
        summary.append(f"{n:>9,} events  {label:48s} {statistics.median(walls):6.3f} / {min(walls):6.3f}")
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import dagster; dagster.DagsterInstance.get()"],
        env=env,
        check=True,
        capture_output=True,
    )
    print(
        "\nfor scale: a bare `python -c 'import dagster; DagsterInstance.get()'` takes "
        f"{time.perf_counter() - t:.3f}s"
    )
    return summary


if __name__ == "__main__":
    main()
