"""`smallcaps-ingest status` and `partition-range`: exact counts on a generated tree (--verify), the
counts from the partitions' last materializations (the default), the instance's materialization
metadata (events/min, ETA, API usage, errors by type, failed runs), --json, TTY."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from dagster._core.test_utils import create_run_for_test

from smallcaps_ingest import layout
from smallcaps_ingest.core import shape, store
from smallcaps_ingest.core.events import validate_events
from smallcaps_ingest.core.manifest import build_manifest
from smallcaps_ingest.ops import cli, status, summary
from smallcaps_ingest.ops import instance as ins

EW = dg.AssetKey("event_windows")
CLI = Path(sys.executable).with_name("smallcaps-ingest")


# --- a small tree with known complete/partial/missing/extra events and tmp orphans ---------------


def frame(schema: dict[str, pl.DataType], n: int, start_ns: int = 1_710_165_600_000_000_000) -> pl.DataFrame:
    """n rows of a frame with exactly `schema` (the on-disk contract from shape.py)."""
    cols: dict[str, list] = {}
    for name, dtype in schema.items():
        if isinstance(dtype, pl.Datetime):
            cols[name] = [start_ns + i * 1_000_000 for i in range(n)]
        elif isinstance(dtype, pl.List):
            cols[name] = [[12, 37]] * n
        elif dtype == pl.String():
            cols[name] = [f"id{i}" for i in range(n)]
        elif dtype in (pl.Float64(), pl.Float32()):
            cols[name] = [1.0 + i / 100 for i in range(n)]
        else:
            cols[name] = list(range(n))
    df = pl.DataFrame(
        cols, schema={k: (pl.Int64 if isinstance(v, pl.Datetime) else v) for k, v in schema.items()}
    )
    return df.cast(schema)  # type: ignore[arg-type]


def trades(n: int) -> pl.DataFrame:
    return frame(shape.TRADES_SCHEMA, n)


def quotes(n: int) -> pl.DataFrame:
    return frame(shape.QUOTES_SCHEMA, n)


@dataclass
class Tree:
    data_dir: Path
    manifest: pl.DataFrame
    ids: dict[str, list[str]]
    extra_ids: dict[str, str] = field(default_factory=dict)
    orphans: list[Path] = field(default_factory=list)

    def bytes_of(self, symbol: str | None = None) -> int:
        root = store.windows_root(self.data_dir)
        tops = [root / f"symbol={symbol}"] if symbol else [root]
        return sum(
            os.path.getsize(os.path.join(d, f))
            for top in tops
            for d, _, fs in os.walk(top)
            for f in fs
            if f in store.FILES
        )


def make_tree(data_dir: Path) -> Tree:
    """AAA: 5/5 complete (one empty window), a tmp orphan inside a complete event.
    BBB: 4 events: 2 complete, 1 partial (trades only), 1 missing; plus 1 extra complete event not in
    the manifest and a tmp orphan at the symbol level. CCC: 3 events, none on disk, but one event
    directory holding only an interrupted write (.tmp). DDD: on disk only (1 complete event)."""
    rows = [("AAA", i) for i in range(5)] + [("BBB", i) for i in range(4)] + [("CCC", i) for i in range(3)]
    events = validate_events(
        pl.DataFrame(
            {
                "symbol": [s for s, _ in rows],
                "event_type": ["volume_spike"] * len(rows),
                "timestamp": pl.Series(
                    [
                        datetime(2024, 3, 11, 14, 0, tzinfo=UTC) + timedelta(minutes=5 * k)
                        for k in range(len(rows))
                    ],
                    dtype=pl.Datetime("us", "UTC"),
                ),
            }
        )
    )
    manifest, _ = build_manifest(events)
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_parquet(data_dir / "manifest.parquet")
    ids = {s: manifest.filter(pl.col("symbol") == s)["event_id"].to_list() for s in ("AAA", "BBB", "CCC")}
    t = Tree(data_dir, manifest, ids)
    a = ids["AAA"]
    store.write_event(data_dir, "AAA", a[0], trades(0), quotes(0))
    for e in a[1:]:
        store.write_event(data_dir, "AAA", e, trades(3), quotes(5))
    orphan = store.event_dir(data_dir, "AAA", a[1]) / "trades.parquet.tmp.999.1"
    orphan.write_bytes(b"partial write")
    t.orphans.append(orphan)
    b = ids["BBB"]
    for e in b[:2]:
        store.write_event(data_dir, "BBB", e, trades(2), quotes(4))
    store.atomic_write_parquet(trades(2), store.event_dir(data_dir, "BBB", b[2]) / "trades.parquet")
    t.extra_ids["BBB"] = "BBB_VOLUME-SPIKE_20240311_150000_cafebabe"
    store.write_event(data_dir, "BBB", t.extra_ids["BBB"], trades(1), quotes(1))
    orphan = store.symbol_dir(data_dir, "BBB") / "junk.tmp.42"
    orphan.write_bytes(b"x")
    t.orphans.append(orphan)
    c_dir = store.event_dir(data_dir, "CCC", ids["CCC"][0])
    c_dir.mkdir(parents=True)
    orphan = c_dir / "quotes.parquet.tmp.7.8"
    orphan.write_bytes(b"yy")
    t.orphans.append(orphan)
    t.extra_ids["DDD"] = "DDD_VOLUME-SPIKE_20240311_140000_deadbeef"
    store.write_event(data_dir, "DDD", t.extra_ids["DDD"], trades(0), quotes(2))
    return t


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return make_tree(tmp_path / "data")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A real instance in a temporary DAGSTER_HOME (what the CLI opens)."""
    h = tmp_path / "dagster_home"
    h.mkdir()
    (h / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(h))
    instance = dg.DagsterInstance.get()
    try:
        yield instance
    finally:
        instance.dispose()


def materialize(instance: dg.DagsterInstance, symbol: str, **metadata: object) -> None:
    md = dict(metadata)
    if "errors_by_type" in md:
        md["errors_by_type"] = dg.MetadataValue.json(md["errors_by_type"])  # type: ignore[arg-type]
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=EW, partition=symbol, metadata=md))


EXPECTED_DISK = {
    "events": {
        "total": 12,
        "done": 7,
        "partial": 1,
        "missing": 4,
        "extra_on_disk": 2,
        "complete_on_disk": 9,
        "partial_on_disk": 1,
        "empty_event_dirs": 1,
        "pct_done": 58.33,
    },
    "symbols": {"total": 3, "complete": 1, "started": 1, "not_started": 1, "on_disk": 4},
}


# --- the disk scan ------------------------------------------------------------------------------


def test_constants_are_the_stores() -> None:
    assert status.FILES == store.FILES == layout.FILES
    assert status.TMP_MARK == store.TMP_MARK == layout.TMP_MARK
    assert status.SOURCE_FILE == store.SOURCE_FILE == layout.SOURCE_FILE
    assert store.windows_root("/d") == Path("/d") / layout.WINDOWS_DIR


def test_fast_scan_agrees_with_store_scan_symbol(tree: Tree) -> None:
    for sym in ("AAA", "BBB", "CCC", "DDD"):
        ref = store.scan_symbol(tree.data_dir, sym)
        got = layout.scan_symbol_dir(str(store.symbol_dir(tree.data_dir, sym)))
        assert got.complete == ref.complete
        assert got.partial == ref.partial
        assert sorted(got.orphans) == sorted(str(p) for p in ref.orphans)
        assert (got.files, got.bytes) == (ref.files, ref.bytes)


def test_disk_summary_exact_counts(tree: Tree) -> None:
    d = status.disk_summary(str(tree.data_dir))
    assert d["events"] == EXPECTED_DISK["events"]
    assert d["symbols"] == EXPECTED_DISK["symbols"]
    assert d["manifest"]["present"] is True
    assert (d["manifest"]["events"], d["manifest"]["symbols"]) == (12, 3)
    assert d["disk"]["files"] == 10 + 7 + 2
    assert d["disk"]["bytes"] == tree.bytes_of()
    assert d["disk"]["tmp_orphans"] == 3
    assert sorted(d["disk"]["tmp_orphan_examples"]) == sorted(
        os.path.relpath(p, tree.data_dir) for p in tree.orphans
    )


def test_no_manifest_and_no_instance_are_said_clearly(
    tree: Tree, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tree.data_dir / "manifest.parquet").unlink()
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    st = status.collect_status(str(tree.data_dir))
    assert st["manifest"]["present"] is False
    assert st["events"]["total"] is None and st["events"]["missing"] is None
    assert st["events"]["complete_on_disk"] == 9
    assert st["instance"]["present"] is False
    assert "DAGSTER_HOME is not set" in st["instance"]["message"]
    assert st["throughput"]["events_per_min"] is None and st["throughput"]["eta"] is None
    assert cli.main(["status", "--data-dir", str(tree.data_dir)]) == 0
    out = capsys.readouterr().out
    assert "manifest    none yet" in out and "materialize the manifest asset first" in out
    assert "no Dagster instance: DAGSTER_HOME is not set" in out
    # an unreadable manifest is reported, not a crash
    (tree.data_dir / "manifest.parquet").write_bytes(b"not parquet")
    st = status.collect_status(str(tree.data_dir))
    assert st["manifest"]["present"] is False and st["manifest"]["error"]
    assert any("could not be read" in n for n in st["notes"])
    # an empty data dir works too
    assert cli.main(["status", "--data-dir", str(tree.data_dir / "nothing"), "--json"]) == 0
    empty = json.loads(capsys.readouterr().out)
    assert empty["disk"] == {"files": 0, "bytes": 0, "tmp_orphans": 0, "tmp_orphan_examples": []}


# --- throughput, ETA, API usage and errors from materialization metadata -----------------------


def _pt(ts: float, seconds: float, written: int, requests: int = 0, **kw: object) -> ins.MatPoint:
    return ins.MatPoint(
        ts=ts,
        partition="X",
        run_id="r",
        storage_id=1,
        seconds=seconds,
        written=written,
        requests=requests,
        **kw,
    )  # type: ignore[arg-type]


def test_throughput_window_exact() -> None:
    now = 10_000.0
    # one run started at 9_400 (600 s ago): three symbols done so far, 300 events, 1200 requests
    pts = [_pt(9_700, 300, 100, 400), _pt(9_900, 500, 100, 400), _pt(9_950, 550, 100, 400, throttled=2)]
    tp = ins.throughput(pts, now=now, window_s=1800)
    assert tp["elapsed_s"] == 600.0
    assert tp["events_per_min"] == 30.0
    assert tp["requests_per_s"] == 2.0
    assert tp["429s"] == 2 and tp["materializations"] == 3 and tp["basis"] == "last 30 min"
    # a run that started before the window: the span is clipped to the window
    tp = ins.throughput([_pt(9_000, 7_200, 600)], now=now, window_s=1800)
    assert tp["elapsed_s"] == 1800.0 and tp["events_per_min"] == 20.0
    # reconciled materializations carry no work
    tp = ins.throughput([_pt(9_990, 0, 0, reconciled=True)], now=now, window_s=1800)
    assert tp["events_per_min"] is None and tp["materializations"] == 0
    # only the most recent ones were read: the span starts at the earliest read, its work left out
    pts = [_pt(9_000, 300, 50), _pt(9_400, 3_000, 100), _pt(9_700, 3_300, 100)]
    tp = ins.throughput(pts, now=now, window_s=1800, capped=True)
    assert tp["elapsed_s"] == 1_000.0 and tp["events_written"] == 200 and tp["events_per_min"] == 12.0
    assert tp["basis"] == "last 30 min (the 3 most recent materializations)"
    # nothing in the window: the last N, labelled
    tp = ins.throughput([], now=now, window_s=1800, fallback=[_pt(5_000, 120, 60), _pt(5_060, 180, 60)])
    assert (
        tp["elapsed_s"] == 180.0 and tp["events_per_min"] == 40.0 and "none in the last 30 min" in tp["basis"]
    )


def test_status_reads_materialization_metadata(tree: Tree) -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("symbols", ["AAA", "BBB", "CCC"])
        materialize(
            instance,
            "AAA",
            events_total=5,
            events_written=5,
            requests=20,
            seconds=60.0,
            **{"429s": 3},
            budget_wait_s=1.5,
            errors_by_type={"429": 3, "5xx": 2, "timeout": 0},
        )
        materialize(
            instance,
            "BBB",
            events_total=4,
            events_written=2,
            requests=10,
            seconds=120.0,
            **{"429s": 1},
            budget_wait_s=0.5,
            errors_by_type={"429": 1, "reset": 1, "truncated": 4},
        )
        materialize(instance, "DDD", reconciled=True, events_total=1, events_complete=1)
        create_run_for_test(
            instance,
            job_name="__ASSET_JOB",
            status=dg.DagsterRunStatus.FAILURE,
            asset_selection=frozenset({EW}),
        )
        create_run_for_test(instance, job_name="ingest_event_windows", status=dg.DagsterRunStatus.FAILURE)
        create_run_for_test(
            instance,
            job_name="__ASSET_JOB",
            status=dg.DagsterRunStatus.FAILURE,
            asset_selection=frozenset({dg.AssetKey("manifest")}),
        )  # not an ingest run
        create_run_for_test(
            instance,
            job_name="__ASSET_JOB",
            status=dg.DagsterRunStatus.STARTED,
            asset_selection=frozenset({EW}),
        )
        recs = instance.fetch_materializations(EW, limit=10).records
        ts = {r.partition_key: r.timestamp for r in recs}
        last = max(ts.values())
        st = status.collect_status(str(tree.data_dir), instance=instance, now=last, max_rps=10.0, verify=True)

    elapsed = last - min(ts["AAA"] - 60.0, ts["BBB"] - 120.0)  # the earliest work start to now
    tp = st["throughput"]
    assert tp["materializations"] == 2 and tp["events_written"] == 7
    assert tp["elapsed_s"] == pytest.approx(elapsed, abs=1e-3)
    assert tp["events_per_min"] == pytest.approx(7 / elapsed * 60, abs=1e-3)  # rounded to 3 decimals
    assert tp["remaining_events"] == 12 - 7
    assert tp["eta_s"] == pytest.approx(5 / (7 / elapsed * 60) * 60, abs=0.1)
    api = st["api"]
    assert api["requests"] == 30 and api["429s"] == 4 and api["budget_wait_s"] == 2.0
    assert api["requests_per_s"] == pytest.approx(30 / elapsed, abs=1e-4)
    assert api["utilization"] == pytest.approx(30 / elapsed / 10.0, abs=1e-4) and api["max_rps"] == 10.0
    er = st["errors"]
    assert er["by_type"] == {"429": 4, "5xx": 2, "reset": 1, "timeout": 0, "truncated": 4}
    assert er["total"] == 11 and er["failed_runs"] == 2
    inst = st["instance"]
    assert inst["present"] and inst["partitions"] == 3 and inst["materialized_partitions"] == 3
    assert inst["materializations"] == 3 and inst["reconciled_materializations"] == 1
    assert inst["runs_in_progress"] == 1
    assert st["events"] == EXPECTED_DISK["events"]
    text = status_text(st)
    assert "429 4, 5xx 2, reset 1, truncated 4" in text and "failed runs 2" in text and "ETA" in text


def test_lifetime_error_totals_are_read_incrementally(tmp_path: Path) -> None:
    cache = tmp_path / "_state" / "status_cache.json"
    with dg.instance_for_test() as instance:
        materialize(instance, "AAA", events_written=1, errors_by_type={"429": 1})
        materialize(instance, "BBB", events_written=2, errors_by_type={"5xx": 2})
        first = ins.lifetime_totals(instance, str(cache))
        assert first["errors_by_type"] == {"429": 1, "5xx": 2} and first["materializations"] == 2
        assert cache.is_file()
        seen: list[int | None] = []
        orig = ins.fetch_points

        def spy(inst, **kw):  # type: ignore[no-untyped-def]
            seen.append(kw.get("after_storage_id"))
            return orig(inst, **kw)

        materialize(instance, "CCC", events_written=3, errors_by_type={"429": 5, "reset": 1})
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ins, "fetch_points", spy)
            second = ins.lifetime_totals(instance, str(cache))
        assert seen and seen[0] is not None  # only what came after the cached storage id
        assert second["errors_by_type"] == {"429": 6, "5xx": 2, "reset": 1}
        assert second["materializations"] == 3 and second["events_written"] == 6
        instance.wipe_assets([EW])  # a wipe resets the sums
        third = ins.lifetime_totals(instance, str(cache))
        assert third["materializations"] == 0 and third["errors_by_type"] == {}
        materialize(instance, "AAA", events_written=4, errors_by_type={"timeout": 1})
        fourth = ins.lifetime_totals(instance, str(cache))
        assert fourth["materializations"] == 1 and fourth["errors_by_type"] == {"timeout": 1}


# --- the CLI ------------------------------------------------------------------------------------

STATUS_KEYS = {
    "data_dir",
    "generated_at",
    "manifest",
    "events",
    "symbols",
    "disk",
    "instance",
    "throughput",
    "api",
    "errors",
    "lifetime",
    "notes",
    "timings_s",
}


def test_cli_status_json_schema_in_a_subprocess(tree: Tree, home: dg.DagsterInstance) -> None:
    home.add_dynamic_partitions("symbols", ["AAA", "BBB", "CCC"])
    materialize(home, "AAA", events_written=5, requests=20, seconds=60.0, errors_by_type={"429": 2})
    env = {**os.environ, "DAGSTER_HOME": home.root_directory, "POLYGON_MAX_RPS": "45"}
    proc = subprocess.run(
        [str(CLI), "status", "--json", "--verify", "--data-dir", str(tree.data_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)  # stdout is a pipe: JSON only, no progress bar anywhere
    assert "scanning symbols" not in proc.stderr and "\r" not in proc.stdout + proc.stderr
    assert set(st) == STATUS_KEYS
    assert st["events"] == EXPECTED_DISK["events"] and st["symbols"] == EXPECTED_DISK["symbols"]
    assert (
        st["disk"]["files"] == 19
        and st["disk"]["bytes"] == tree.bytes_of()
        and st["disk"]["tmp_orphans"] == 3
    )
    assert set(st["throughput"]) >= {
        "basis",
        "events_per_min",
        "eta_s",
        "eta",
        "remaining_events",
        "elapsed_s",
    }
    assert set(st["api"]) == {
        "requests_per_s",
        "max_rps",
        "utilization",
        "requests",
        "429s",
        "budget_wait_s",
        "basis",
    }
    assert st["api"]["max_rps"] == 45.0 and st["api"]["requests"] == 20
    assert set(st["errors"]) == {"by_type", "total", "recent_by_type", "failed_runs", "failed_run_ids"}
    assert st["errors"]["by_type"] == {"429": 2}
    assert st["instance"]["present"] is True and st["instance"]["partitions"] == 3
    assert {"scan", "manifest", "total"} <= set(st["timings_s"])
    # the text form, same process model
    proc = subprocess.run(
        [str(CLI), "status", "--verify", "--data-dir", str(tree.data_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and "done 7 (58.3%)  partial 1  missing 4" in proc.stdout


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_tty(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert cli.main(["status", "--data-dir", str(tree.data_dir)]) == 0
    assert "scanning symbols" not in err.getvalue() + out.getvalue()
    tout, terr = _Tty(), _Tty()
    monkeypatch.setattr(sys, "stdout", tout)
    monkeypatch.setattr(sys, "stderr", terr)
    assert cli.main(["status", "--data-dir", str(tree.data_dir)]) == 0
    assert "scanning symbols [" in terr.getvalue() and "4/4" in terr.getvalue()
    assert terr.getvalue().endswith("\r\x1b[K")  # the bar is cleared before the report prints
    assert "scanning symbols" not in tout.getvalue()


def test_partition_range(home: dg.DagsterInstance, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["partition-range"]) == 1
    assert "no 'symbols' partitions yet" in capsys.readouterr().err
    home.add_dynamic_partitions("symbols", ["MMM", "AAA", "ZZZ", "BRK.B"])
    assert cli.main(["partition-range"]) == 0
    assert capsys.readouterr().out == "MMM...BRK.B\n"  # the instance's order, not sorted


def test_partition_range_without_instance(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert cli.main(["partition-range"]) == 1
    assert "DAGSTER_HOME is not set" in capsys.readouterr().err


# --- status --verify: exact after every kind of change -----------------------------------------


def _no_timings(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "timings_s"}


def _check(tree: Tree, **expect: object) -> dict:
    """The given figures of a full walk of the tree are exact."""
    got = status.disk_summary(str(tree.data_dir))
    flat = {**got["events"], **{f"symbols_{k}": v for k, v in got["symbols"].items()}, **got["disk"]}
    for k, v in expect.items():
        assert flat[k] == v, (k, flat[k], v)
    return got


def test_verify_counts_exactly_through_every_change(tree: Tree) -> None:
    data = tree.data_dir
    _check(tree, done=7, partial=1, missing=4, extra_on_disk=2, files=19, tmp_orphans=3)
    a, b = tree.ids["AAA"], tree.ids["BBB"]

    # a file deleted inside a complete event
    gone = store.event_dir(data, "AAA", a[2]) / "quotes.parquet"
    size = gone.stat().st_size
    gone.unlink()
    _check(
        tree,
        done=6,
        partial=2,
        missing=4,
        complete_on_disk=8,
        partial_on_disk=2,
        files=18,
        bytes=tree.bytes_of(),
        symbols_complete=0,
        symbols_started=2,
    )
    assert size > 0

    # a .tmp added inside a complete event (no other directory changes)
    (store.event_dir(data, "AAA", a[3]) / "quotes.parquet.tmp.1.2").write_bytes(b"half")
    _check(tree, done=6, partial=2, tmp_orphans=4, files=18)

    # an event directory added (a missing event now complete) and one removed
    store.write_event(data, "BBB", b[3], trades(2), quotes(2))
    _check(tree, done=7, missing=3, complete_on_disk=9, files=20)
    import shutil

    shutil.rmtree(store.event_dir(data, "BBB", b[0]))
    _check(tree, done=6, missing=4, complete_on_disk=8, files=18, bytes=tree.bytes_of())

    # a new symbol (not in the manifest)
    store.write_event(data, "EEE", "EEE_VOLUME-SPIKE_20240311_150000_0badf00d", trades(1), quotes(1))
    _check(tree, extra_on_disk=3, complete_on_disk=9, symbols_on_disk=5, files=20, bytes=tree.bytes_of())

    # a file replaced by one of a different size: in place (no directory changes) and by rename
    f = store.event_dir(data, "AAA", a[4]) / "trades.parquet"
    before = tree.bytes_of()
    _check(tree, bytes=before, files=20)
    with open(f, "ab") as fh:
        fh.write(b"x" * 1234)
    _check(tree, bytes=before + 1234, files=20)  # every data file is measured: no cached size
    store.atomic_write_parquet(trades(500), f)
    _check(tree, bytes=tree.bytes_of(), files=20)
    assert tree.bytes_of() != before + 1234

    # the manifest rewritten (CCC loses an event, AAA gains one): coverage is recounted
    m = tree.manifest
    extra_row = (
        m.filter(pl.col("symbol") == "AAA")
        .head(1)
        .with_columns(event_id=pl.lit("AAA_VOLUME-SPIKE_20240311_160000_feedface"))
    )
    m2 = pl.concat([m.filter(pl.col("event_id") != tree.ids["CCC"][2]), extra_row])
    m2.write_parquet(data / "manifest.parquet")
    _check(tree, total=12, missing=4, done=6)  # 12 - 1 + 1 events: AAA 4/6 done, CCC 0/2
    # the manifest removed, then back
    (data / "manifest.parquet").rename(data / "manifest.off")
    got = _check(tree, extra_on_disk=9 + 2)  # every complete and partial event
    assert got["manifest"]["present"] is False and got["events"]["total"] is None
    (data / "manifest.off").rename(data / "manifest.parquet")
    _check(tree, total=12, done=6)
    # the symbol directory removed
    shutil.rmtree(store.symbol_dir(data, "EEE"))
    _check(tree, symbols_on_disk=4, extra_on_disk=2)


# --- the default: counts from the partitions' last materializations ------------------------------


def test_status_counts_from_the_instance_without_walking_the_disk(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("symbols", ["AAA", "BBB", "CCC"])
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key="manifest", metadata={"events": 12, "symbols": 3})
        )
        materialize(instance, "BBB", events_total=4, events_complete=1, bytes=10, events_written=1)
        materialize(instance, "AAA", events_total=5, events_complete=5, bytes=100, events_written=5)
        materialize(instance, "BBB", events_total=4, events_complete=2, bytes=20, events_written=1)
        materialize(instance, "DDD", events_total=1, events_complete=1, bytes=7)  # not a partition

        def no_walk(*a: object, **k: object) -> None:
            raise AssertionError("the default status walked the tree")

        monkeypatch.setattr(layout, "scan_tree", no_walk)
        st = status.collect_status(str(tree.data_dir), instance=instance)
        assert st["events"] == {
            "total": 12, "done": 7, "partial": 0, "missing": 5, "extra_on_disk": None,
            "complete_on_disk": None, "partial_on_disk": None, "empty_event_dirs": None, "pct_done": 58.33,
        }
        assert st["symbols"] == {"total": 3, "complete": 1, "started": 1, "not_started": 1, "on_disk": None}
        assert st["manifest"]["present"] and (st["manifest"]["events"], st["manifest"]["symbols"]) == (12, 3)
        assert st["disk"] == {"files": 14, "bytes": 120, "tmp_orphans": None, "tmp_orphan_examples": []}
        assert st["instance"]["materialized_partitions"] == 3 and st["throughput"]["remaining_events"] == 5
        assert any("--verify" in n for n in st["notes"])
        text = status_text(st)
        assert "done 7 (58.3%)" in text and "from the instance" in text
        monkeypatch.undo()
        # --verify: the disk's own answer
        ver = status.collect_status(str(tree.data_dir), instance=instance, verify=True)
        assert ver["events"] == EXPECTED_DISK["events"] and ver["disk"]["tmp_orphans"] == 3
        instance.wipe_assets([EW])  # a wipe hides every earlier materialization
        st = status.collect_status(str(tree.data_dir), instance=instance)
        assert st["events"]["done"] == 0 and st["symbols"]["not_started"] == 3


def status_text(st: dict) -> str:
    from smallcaps_ingest.ops import render

    return render.render_text(st)


# --- every shape of record the instance holds ---------------------------------------------------


def _populate(instance: dg.DagsterInstance) -> None:
    """Every shape of record status reads: metadata of each value type, reconciled and unpartitioned
    materializations, another asset's, runs of every status, selections and check-only runs."""
    instance.add_dynamic_partitions("symbols", ["AAA", "BBB", "CCC", "DDD", "EEE"])
    materialize(
        instance,
        "AAA",
        events_written=5,
        requests=20,
        seconds=60.0,
        **{"429s": 3},
        budget_wait_s=1.5,
        errors_by_type={"429": 3, "5xx": 2, "timeout": 0},
    )
    materialize(instance, "BBB", events_written=2, requests=10, seconds=120.0, errors_by_type={"429": 1})
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=EW,
            partition="CCC",
            metadata={
                "errors_by_type": dg.MetadataValue.text('{"reset": 2, "truncated": 1.0, "odd": "x"}'),
                "events_written": dg.MetadataValue.text("7"),
                "requests": dg.MetadataValue.float(9.7),
                "seconds": dg.MetadataValue.int(30),
                "429s": dg.MetadataValue.text("not a number"),
                "budget_wait_s": dg.MetadataValue.md("2.5"),
                "reconciled": False,
                "path": dg.MetadataValue.path("/x"),
                "other": dg.MetadataValue.table_schema(dg.TableSchema(columns=[])),  # not read by status
            },
        )
    )
    materialize(instance, "DDD", reconciled=True, events_total=1, events_complete=1)
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=EW, metadata={"events_written": 4}))
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key="manifest", metadata={"events_written": 100})
    )
    for job, st, sel, checks in (
        ("__ASSET_JOB", dg.DagsterRunStatus.FAILURE, frozenset({EW}), None),
        ("ingest_event_windows", dg.DagsterRunStatus.FAILURE, None, None),
        ("__ASSET_JOB", dg.DagsterRunStatus.FAILURE, frozenset({dg.AssetKey("manifest")}), None),
        ("__ASSET_JOB", dg.DagsterRunStatus.STARTED, frozenset({EW}), None),
        ("__ASSET_JOB", dg.DagsterRunStatus.NOT_STARTED, None, None),
        ("other_job", dg.DagsterRunStatus.STARTING, None, None),
        ("__ASSET_JOB", dg.DagsterRunStatus.CANCELING, frozenset({EW, dg.AssetKey(["a", "b"])}), None),
        ("__ASSET_JOB", dg.DagsterRunStatus.NOT_STARTED, None, frozenset({dg.AssetCheckKey(EW, "c")})),
        ("ingest_event_windows", dg.DagsterRunStatus.SUCCESS, None, None),
    ):
        create_run_for_test(
            instance, job_name=job, status=st, asset_selection=sel, asset_check_selection=checks
        )


def time_now() -> float:
    import time

    return time.time()


def test_instance_reads_every_record_shape(home: dg.DagsterInstance, tmp_path: Path) -> None:
    _populate(home)
    s, _ = summary.instance_summary(home, now=time_now(), window_s=1800, cache_path=str(tmp_path / "c"))
    assert s["errors"]["by_type"] == {"429": 4, "5xx": 2, "reset": 2, "timeout": 0, "truncated": 1}
    assert s["instance"]["materializations"] == 5 and s["instance"]["reconciled_materializations"] == 1
    assert s["errors"]["failed_runs"] == 2 and s["instance"]["runs_in_progress"] == 3
    home.wipe_assets([EW])  # a wipe hides every earlier materialization
    materialize(home, "EEE", events_written=3, errors_by_type={"5xx": 1})
    assert ins.lifetime_totals(home, str(tmp_path / "b4"))["errors_by_type"] == {"5xx": 1}
    assert ins.lifetime_totals(home, str(tmp_path / "c"))["errors_by_type"] == {"5xx": 1}


def test_ledger_reads_what_the_dagster_api_reads(
    home: dg.DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger's newest materializations, window and per-partition counts are the API's own."""
    _populate(home)
    recs = home.fetch_materializations(EW, limit=100).records
    last = max(r.timestamp for r in recs)
    for limit in (ins.RECENT_LIMIT, 2):  # 2: the capped window
        monkeypatch.setattr(ins, "RECENT_LIMIT", limit)
        cache = str(tmp_path / f"ledger{limit}.json")
        for _ in range(2):  # read, then from the cache
            led = ins.read_ledger(home, cache)
            for now, window in ((last, 1800.0), (last + 86_400 * 10, 1800.0), (last + 0.5, 0.0)):
                got = led.window(now - window)
                assert got == ins.fetch_points(home, after_timestamp=now - window, limit=limit), (now, window)
            assert led.last(3) == ins.fetch_points(home, limit=min(3, limit))
        newest = {r.partition_key: r for r in reversed(recs) if r.partition_key}
        assert set(led.latest) == set(newest) == {"AAA", "BBB", "CCC", "DDD"}
        assert (led.latest["DDD"].events_total, led.latest["DDD"].events_complete) == (1, 1)
        assert all(led.latest[k].storage_id == r.storage_id for k, r in newest.items())


def test_a_metadata_value_of_another_type_is_read_as_zero(
    home: dg.DagsterInstance, tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    home.add_dynamic_partitions("symbols", ["AAA"])
    home.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=EW, partition="AAA", metadata={"seconds": dg.MetadataValue.asset(dg.AssetKey("x"))}
        )
    )
    st = status.collect_status(str(tree.data_dir), dagster_home=home.root_directory, now=time_now())
    assert st["instance"]["materializations"] == 1 and st["instance"]["present"]


def test_cli_status_default_and_verify_agree(tree: Tree, home: dg.DagsterInstance) -> None:
    """The CLI: the instance's figures are the same with and without --verify; --verify counts the
    disk exactly."""
    _populate(home)
    env = {**os.environ, "DAGSTER_HOME": home.root_directory}
    # a window with nothing in it: the rate comes from the last materializations, independent of now
    base = [str(CLI), "status", "--json", "--data-dir", str(tree.data_dir), "--window-minutes", "0.00001"]

    def run(*extra: str) -> dict:
        proc = subprocess.run(
            [*base, *extra], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        return {k: v for k, v in out.items() if k not in ("generated_at", "timings_s")}

    ref = run("--verify")
    assert ref["events"] == EXPECTED_DISK["events"] and ref["errors"]["failed_runs"] == 2
    default = run()
    for key in ("instance", "errors", "lifetime", "api", "data_dir"):
        assert default[key] == ref[key], key
    assert run() == default
    code = (  # the default reads no Parquet file: neither the manifest nor the tree
        "import sys; from smallcaps_ingest.ops import cli; "
        f"cli.main(['status', '--data-dir', {str(tree.data_dir)!r}]); "
        "print('polars' in sys.modules, 'pyarrow' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    assert proc.stdout.strip().splitlines()[-1] == "False False", proc.stdout


def test_lifetime_cache_of_the_wrong_shape_is_recomputed(tmp_path: Path) -> None:
    cache = tmp_path / "_state" / "status_cache.json"
    with dg.instance_for_test() as instance:
        materialize(instance, "AAA", events_written=1, errors_by_type={"429": 1})
        good = ins.lifetime_totals(instance, str(cache))
        key = next(iter(json.loads(cache.read_text())))
        for bad in (
            {"materializations": "7"},
            {"errors_by_type": {"429": "many"}},
            {"errors_by_type": ["429"]},
            {"after_storage_id": "1"},
            {"latest": {"AAA": ["1", 2, 3, 4]}},
            {"latest": []},
            {"recent": [[1, 2]]},
            {"recent": {}},
        ):
            entry = {**json.loads(cache.read_text())[key], **bad}
            cache.write_text(json.dumps({key: entry}))
            assert ins.lifetime_totals(instance, str(cache)) == good, bad
        cache.write_text("{not json")
        assert ins.lifetime_totals(instance, str(cache)) == good
