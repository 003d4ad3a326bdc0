"""`smallcaps-ingest status` and `partition-range`: exact counts on a generated tree, the instance's
materialization metadata (events/min, ETA, API usage, errors by type, failed runs), --json, TTY; the
disk cache and the direct SQLite read of the instance, each against the full scan / the Dagster API."""

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

from smallcaps_ingest.core import shape, store
from smallcaps_ingest.core.events import validate_events
from smallcaps_ingest.core.manifest import build_manifest
from smallcaps_ingest.ops import cli, instance_sqlite, status, status_disk

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
    assert status.FILES == store.FILES
    assert status.TMP_MARK == store.TMP_MARK
    assert status.SOURCE_FILE == store.SOURCE_FILE
    assert (status_disk.FILES, status_disk.TMP_MARK) == (store.FILES, store.TMP_MARK)
    assert (status_disk.EVENT_PREFIX, status_disk.SYMBOL_PREFIX, status_disk.WINDOWS_DIR) == (
        status.EVENT_PREFIX,
        status.SYMBOL_PREFIX,
        status.WINDOWS_DIR,
    )
    assert store.windows_root("/d") == Path("/d") / status_disk.WINDOWS_DIR


def test_fast_scan_agrees_with_store_scan_symbol(tree: Tree) -> None:
    for sym in ("AAA", "BBB", "CCC", "DDD"):
        ref = store.scan_symbol(tree.data_dir, sym)
        got = status.scan_symbol_dir(str(store.symbol_dir(tree.data_dir, sym)))
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


def test_scan_with_forked_workers_matches_in_process(tree: Tree) -> None:
    one = status.scan_tree(tree.data_dir)
    two = status.scan_tree(tree.data_dir, workers=3)
    assert one.symbols == two.symbols


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
    assert cli.main(["status", "--data-dir", str(tree.data_dir), "--no-fork"]) == 0
    out = capsys.readouterr().out
    assert "manifest    none yet" in out and "materialize the manifest asset first" in out
    assert "no Dagster instance: DAGSTER_HOME is not set" in out
    # an unreadable manifest is reported, not a crash
    (tree.data_dir / "manifest.parquet").write_bytes(b"not parquet")
    st = status.collect_status(str(tree.data_dir))
    assert st["manifest"]["present"] is False and st["manifest"]["error"]
    assert any("could not be read" in n for n in st["notes"])
    # an empty data dir works too
    assert cli.main(["status", "--data-dir", str(tree.data_dir / "nothing"), "--no-fork", "--json"]) == 0
    empty = json.loads(capsys.readouterr().out)
    assert empty["disk"] == {"files": 0, "bytes": 0, "tmp_orphans": 0, "tmp_orphan_examples": []}


# --- throughput, ETA, API usage and errors from materialization metadata -----------------------


def _pt(ts: float, seconds: float, written: int, requests: int = 0, **kw: object) -> status.MatPoint:
    return status.MatPoint(
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
    tp = status.throughput(pts, now=now, window_s=1800)
    assert tp["elapsed_s"] == 600.0
    assert tp["events_per_min"] == 30.0
    assert tp["requests_per_s"] == 2.0
    assert tp["429s"] == 2 and tp["materializations"] == 3 and tp["basis"] == "last 30 min"
    # a run that started before the window: the span is clipped to the window
    tp = status.throughput([_pt(9_000, 7_200, 600)], now=now, window_s=1800)
    assert tp["elapsed_s"] == 1800.0 and tp["events_per_min"] == 20.0
    # reconciled materializations carry no work
    tp = status.throughput([_pt(9_990, 0, 0, reconciled=True)], now=now, window_s=1800)
    assert tp["events_per_min"] is None and tp["materializations"] == 0
    # only the most recent ones were read: the span starts at the earliest read, its work left out
    pts = [_pt(9_000, 300, 50), _pt(9_400, 3_000, 100), _pt(9_700, 3_300, 100)]
    tp = status.throughput(pts, now=now, window_s=1800, capped=True)
    assert tp["elapsed_s"] == 1_000.0 and tp["events_written"] == 200 and tp["events_per_min"] == 12.0
    assert tp["basis"] == "last 30 min (the 3 most recent materializations)"
    # nothing in the window: the last N, labelled
    tp = status.throughput([], now=now, window_s=1800, fallback=[_pt(5_000, 120, 60), _pt(5_060, 180, 60)])
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
        st = status.collect_status(str(tree.data_dir), instance=instance, now=last, max_rps=10.0)

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
    text = status.render_text(st)
    assert "429 4, 5xx 2, reset 1, truncated 4" in text and "failed runs 2" in text and "ETA" in text


def test_lifetime_error_totals_are_read_incrementally(tmp_path: Path) -> None:
    cache = tmp_path / "_state" / "status_cache.json"
    with dg.instance_for_test() as instance:
        materialize(instance, "AAA", events_written=1, errors_by_type={"429": 1})
        materialize(instance, "BBB", events_written=2, errors_by_type={"5xx": 2})
        first = status.lifetime_totals(instance, str(cache))
        assert first["errors_by_type"] == {"429": 1, "5xx": 2} and first["materializations"] == 2
        assert cache.is_file()
        seen: list[int | None] = []
        orig = status.fetch_points

        def spy(inst, **kw):  # type: ignore[no-untyped-def]
            seen.append(kw.get("after_storage_id"))
            return orig(inst, **kw)

        materialize(instance, "CCC", events_written=3, errors_by_type={"429": 5, "reset": 1})
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(status, "fetch_points", spy)
            second = status.lifetime_totals(instance, str(cache))
        assert seen and seen[0] is not None  # only what came after the cached storage id
        assert second["errors_by_type"] == {"429": 6, "5xx": 2, "reset": 1}
        assert second["materializations"] == 3 and second["events_written"] == 6
        instance.wipe_assets([EW])  # a wipe resets the sums
        third = status.lifetime_totals(instance, str(cache))
        assert third["materializations"] == 0 and third["errors_by_type"] == {}
        materialize(instance, "AAA", events_written=4, errors_by_type={"timeout": 1})
        fourth = status.lifetime_totals(instance, str(cache))
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
        [str(CLI), "status", "--json", "--data-dir", str(tree.data_dir)],
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
        [str(CLI), "status", "--data-dir", str(tree.data_dir)],
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
    assert cli.main(["status", "--data-dir", str(tree.data_dir), "--no-fork"]) == 0
    assert "scanning symbols" not in err.getvalue() + out.getvalue()
    tout, terr = _Tty(), _Tty()
    monkeypatch.setattr(sys, "stdout", tout)
    monkeypatch.setattr(sys, "stderr", terr)
    assert cli.main(["status", "--data-dir", str(tree.data_dir), "--no-fork"]) == 0
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


# --- the disk cache: never a different answer from a full scan -----------------------------------


def _no_timings(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "timings_s"}


def _age_tree() -> None:
    """Let every ctime in the tree become older than the racy margin, so the cache trusts it."""
    import time

    time.sleep(status_disk.RACY_NS / 1e9 + 0.1)


class _ListdirSpy:
    """Counts the directory listings the cached scan makes (the work the cache saves)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real = os.listdir

        def spy(path: str = ".") -> list[str]:
            self.paths.append(str(path))
            return real(path)

        monkeypatch.setattr(status_disk.os, "listdir", spy)

    def take(self) -> list[str]:
        out, self.paths = self.paths, []
        return out


def _check(tree: Tree, spy: _ListdirSpy | None = None, **expect: object) -> dict:
    """The cached summary equals the full scan; the given figures are exact. With ``spy``, only the
    cached scan's listings are left in it."""
    full = status.full_disk_summary(str(tree.data_dir))
    if spy is not None:
        spy.take()
    got = status.disk_summary(str(tree.data_dir))
    assert _no_timings(got) == _no_timings(full)
    flat = {**got["events"], **{f"symbols_{k}": v for k, v in got["symbols"].items()}, **got["disk"]}
    for k, v in expect.items():
        assert flat[k] == v, (k, flat[k], v)
    return got


def test_disk_cache_agrees_with_a_full_scan_through_every_change(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tree.data_dir
    cache = data / "_state" / status_disk.DISK_CACHE
    spy = _ListdirSpy(monkeypatch)
    _age_tree()
    _check(tree, spy, done=7, partial=1, missing=4, extra_on_disk=2, files=19, tmp_orphans=3)
    assert cache.is_file() and len(spy.take()) == 4 + 11  # cold: 4 symbol and 11 event directories
    _check(tree, spy, done=7, partial=1, missing=4, extra_on_disk=2, files=19, tmp_orphans=3)
    assert spy.take() == []  # warm and unchanged: no listing at all, one stat per event directory
    a, b = tree.ids["AAA"], tree.ids["BBB"]

    # a file deleted inside a complete event
    gone = store.event_dir(data, "AAA", a[2]) / "quotes.parquet"
    size = gone.stat().st_size
    gone.unlink()
    _check(
        tree,
        spy,
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
    assert spy.take() == [str(store.event_dir(data, "AAA", a[2]))]  # only the changed event is listed
    assert size > 0

    # a .tmp added inside a complete event (no other directory changes)
    (store.event_dir(data, "AAA", a[3]) / "quotes.parquet.tmp.1.2").write_bytes(b"half")
    _check(tree, spy, done=6, partial=2, tmp_orphans=4, files=18)
    # a[2] changed less than RACY_NS ago, so it is listed again too (its ctime is not trusted yet)
    assert sorted(spy.take()) == sorted(str(store.event_dir(data, "AAA", e)) for e in (a[2], a[3]))

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
    _age_tree()
    _check(tree, bytes=before, files=20)  # every directory trusted again
    with open(f, "ab") as fh:
        fh.write(b"x" * 1234)
    # rewritten in place, which changes no directory: a warm run keeps the cached size (one stat
    # per event directory, none per data file: the documented price of status < 1 s), the full
    # scan (--no-cache) sees it, and counts and verdicts are the same either way
    spy.take()
    warm = _no_timings(status.disk_summary(str(data)))
    assert spy.take() == []
    full = _no_timings(status.disk_summary(str(data), cache=False))
    assert (warm["disk"]["bytes"], full["disk"]["bytes"]) == (before, before + 1234)
    warm["disk"]["bytes"] = full["disk"]["bytes"]
    assert warm == full
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


def test_disk_cache_corrupt_stale_or_foreign_is_ignored(tree: Tree) -> None:
    data = tree.data_dir
    cache = data / "_state" / status_disk.DISK_CACHE
    _age_tree()
    ref = _no_timings(status.full_disk_summary(str(data)))
    assert _no_timings(status.disk_summary(str(data))) == ref
    good = cache.read_bytes()
    # truncated, garbage, a flipped byte: ignored (and rewritten)
    for bad in (good[: len(good) // 2], b"not a cache", good[:20] + bytes([good[20] ^ 0xFF]) + good[21:]):
        cache.write_bytes(bad)
        assert status_disk.load(str(cache), str(data / "event_windows")) is None
        assert _no_timings(status.disk_summary(str(data))) == ref
        assert cache.read_bytes() != bad
    # another version, another tree: ignored
    data_obj = status_disk.load(str(cache), str(data / "event_windows"))
    assert data_obj is not None
    root = str(data / "event_windows")
    body = {k: v for k, v in data_obj.items() if k not in ("magic", "version", "root")}
    status_disk.save(str(cache), "/elsewhere", body)
    assert status_disk.load(str(cache), root) is None
    import marshal
    import zlib

    payload = marshal.dumps({**body, "magic": status_disk.CACHE_MAGIC, "version": 999, "root": root})
    cache.write_bytes(b"SCSC" + zlib.crc32(payload).to_bytes(4, "little") + payload)
    assert status_disk.load(str(cache), root) is None
    # a cache that claims an event is complete, recorded under a ctime the directory no longer has
    status_disk.save(str(cache), root, body)
    ent = list(body["symbols"]["BBB"])
    names = ent[1].split("\0")
    i = names.index("event=" + tree.ids["BBB"][2])  # the partial event
    flags = bytearray(ent[3])
    flags[i] = status_disk.F_TRADES | status_disk.F_QUOTES
    ent[3] = bytes(flags)
    ent[0] = 0  # and its symbol listing is to be re-read
    status_disk.save(str(cache), root, {**body, "symbols": {**body["symbols"], "BBB": tuple(ent)}})
    (store.event_dir(data, "BBB", tree.ids["BBB"][2]) / "x.tmp.1").write_bytes(b"")  # its ctime moves
    ref = _no_timings(status.full_disk_summary(str(data)))
    assert _no_timings(status.disk_summary(str(data))) == ref
    # no _state directory can be made (a file is in the way): no cache, same answer
    import shutil

    shutil.rmtree(data / "_state")
    (data / "_state").write_bytes(b"")
    assert _no_timings(status.disk_summary(str(data))) == ref
    assert _no_timings(status.disk_summary(str(data))) == ref


def test_disk_cache_does_not_trust_fresh_ctimes(tree: Tree) -> None:
    """A directory changed within RACY_NS of the scan is listed again next time (racy timestamps)."""
    data = tree.data_dir
    status.disk_summary(str(data))  # right after the tree was written: everything is fresh
    cached = status_disk.load(str(data / "_state" / status_disk.DISK_CACHE), str(data / "event_windows"))
    assert cached is not None
    from array import array

    for sym, ent in cached["symbols"].items():
        assert ent[0] == 0, sym
        assert set(array("q", ent[2])) == {0}, sym
    _age_tree()
    status.disk_summary(str(data))
    cached = status_disk.load(str(data / "_state" / status_disk.DISK_CACHE), str(data / "event_windows"))
    assert cached is not None and all(ent[0] for ent in cached["symbols"].values())


def test_forked_cached_scan_matches(tree: Tree) -> None:
    ref = _no_timings(status.full_disk_summary(str(tree.data_dir)))
    for workers, fork in ((1, True), (3, True), (3, False)):
        got = status.DiskScan(str(tree.data_dir), workers=workers, fork=fork).finish()
        assert _no_timings(got) == ref
    assert _no_timings(status.disk_summary(str(tree.data_dir), cache=False)) == ref


# --- the instance read straight from SQLite: the same answers as the Dagster API ----------------


def _view(instance: dg.DagsterInstance) -> instance_sqlite.SqliteInstanceView:
    view = instance_sqlite.open_view(instance.root_directory)
    assert view is not None
    return view


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


def _same_instance_reads(instance: dg.DagsterInstance, tmp: Path, tag: str) -> None:
    recs = instance.fetch_materializations(EW, limit=100).records
    last = max((r.timestamp for r in recs), default=1_700_000_000.0)
    for now, window in ((last, 1800.0), (last + 86_400 * 10, 1800.0), (last + 0.5, 0.0)):
        view = _view(instance)
        try:
            a = status.instance_summary(instance, now=now, window_s=window, cache_path=str(tmp / f"a{tag}"))
            b = status.instance_summary(view, now=now, window_s=window, cache_path=str(tmp / f"b{tag}"))
            assert _no_timings(a) == _no_timings(b), (now, window)
            for kw in (
                {},
                {"ascending": True, "cap": 2},
                {"after_storage_id": 2, "ascending": True},
                {"limit": 1},
            ):
                assert status.fetch_points(instance, **kw) == status.fetch_points(view, **kw), kw
            for names in (("event_windows",), ("event_windows", "manifest")):
                for statuses in (status.NOT_FINISHED, ["FAILURE"], ["SUCCESS"]):
                    assert status.runs_touching(instance, statuses, names) == status.runs_touching(
                        view, statuses, names
                    )
            assert view.get_materialized_partitions("event_windows") == instance.get_materialized_partitions(
                EW
            )
            assert view.get_dynamic_partitions("symbols") == list(instance.get_dynamic_partitions("symbols"))
            assert view.root_directory == instance.root_directory
        finally:
            view.close()


def test_sqlite_view_reads_what_the_dagster_api_reads(
    home: dg.DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _same_instance_reads(home, tmp_path, "0")  # empty instance
    _populate(home)
    _same_instance_reads(home, tmp_path, "1")
    s = status.instance_summary(_view(home), now=time_now(), window_s=1800, cache_path=str(tmp_path / "c"))
    assert s["errors"]["by_type"] == {"429": 4, "5xx": 2, "reset": 2, "timeout": 0, "truncated": 1}
    assert s["instance"]["materializations"] == 5 and s["instance"]["reconciled_materializations"] == 1
    assert s["errors"]["failed_runs"] == 2 and s["instance"]["runs_in_progress"] == 3
    monkeypatch.setattr(status, "RECENT_LIMIT", 2)  # the capped window
    _same_instance_reads(home, tmp_path, "2")
    monkeypatch.undo()
    home.wipe_assets([EW])  # a wipe hides every earlier materialization
    _same_instance_reads(home, tmp_path, "3")
    materialize(home, "EEE", events_written=3, errors_by_type={"5xx": 1})
    _same_instance_reads(home, tmp_path, "4")
    assert status.lifetime_totals(_view(home), str(tmp_path / "b4"))["errors_by_type"] == {"5xx": 1}


def time_now() -> float:
    import time

    return time.time()


def test_sqlite_view_is_pinned_to_this_dagster(home: dg.DagsterInstance) -> None:
    import sqlite3

    assert dg.__version__.startswith(instance_sqlite.DAGSTER_MINOR)
    assert instance_sqlite.dagster_version() == dg.__version__
    base = Path(home.root_directory) / "history"
    for db in (base / "runs.db", base / "runs" / "index.db"):
        with sqlite3.connect(db) as conn:
            (rev,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        assert rev in instance_sqlite.ALEMBIC_REVISIONS, (db, rev)


def test_sqlite_view_declines_what_it_does_not_mirror(
    home: dg.DagsterInstance, tmp_path: Path, tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(home.root_directory)
    assert instance_sqlite.open_view(str(root)) is not None
    yaml_path = root / "dagster.yaml"
    good = yaml_path.read_text()
    for extra in (
        "run_storage:\n  module: dagster._core.storage.runs\n  class: SqliteRunStorage\n"
        f"  config:\n    base_dir: {root}/history\n",
        "storage:\n  postgres:\n    postgres_url: postgresql://x/y\n",
        "storage:\n  sqlite:\n    base_dir: relative/dir\n",
        "instance_class:\n  module: x\n  class: Y\n",
        "storage: [not, a, mapping\n",  # not YAML
    ):
        yaml_path.write_text(good + extra)
        assert instance_sqlite.open_view(str(root)) is None, extra
    yaml_path.write_text(good + f"storage:\n  sqlite:\n    base_dir: {root}\n")
    assert instance_sqlite.open_view(str(root)) is not None
    # the project's own instance config (storage: sqlite: base_dir: env: DAGSTER_HOME, pools...)
    yaml_path.write_text((Path(__file__).resolve().parents[2] / "dagster_home" / "dagster.yaml").read_text())
    assert instance_sqlite.open_view(str(root)) is not None
    yaml_path.write_text(good)
    fresh = tmp_path / "fresh_home"
    fresh.mkdir()
    assert instance_sqlite.open_view(str(fresh)) is None  # no databases yet: Dagster creates them
    assert instance_sqlite.open_view("relative/home") is None
    monkeypatch.setattr(instance_sqlite, "DAGSTER_MINOR", "9.99.")
    assert instance_sqlite.open_view(str(root)) is None
    monkeypatch.undo()
    monkeypatch.setenv("DAGSTER_HOME", str(root))

    # a metadata value the view does not decode, on a key status reads: status asks Dagster instead
    home.add_dynamic_partitions("symbols", ["AAA"])
    home.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=EW, partition="AAA", metadata={"seconds": dg.MetadataValue.asset(dg.AssetKey("x"))}
        )
    )
    opened: list[bool] = []
    real_open = status.open_instance

    def spy(fast: bool = False):  # type: ignore[no-untyped-def]
        opened.append(fast)
        return real_open(fast)

    monkeypatch.setattr(status, "open_instance", spy)
    now = time_now()
    fast = status.collect_status(str(tree.data_dir), now=now, disk_cache=False)
    assert opened == [True, False]  # the view, then Dagster
    slow = status.collect_status(str(tree.data_dir), now=now, fast_instance=False, disk_cache=False)
    assert _no_timings(fast) == _no_timings(slow)
    assert fast["instance"]["materializations"] == 1


def test_cli_status_same_answer_every_way(tree: Tree, home: dg.DagsterInstance) -> None:
    """The CLI: the SQLite view and the disk cache, cold then warm, against Dagster's API and a full
    scan; and the fast path never imports Dagster."""
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

    ref = run("--dagster-api", "--no-cache")
    assert ref["events"] == EXPECTED_DISK["events"] and ref["errors"]["failed_runs"] == 2
    _age_tree()
    assert run() == ref  # cold cache
    assert run() == ref  # warm
    assert run("--no-fork") == ref
    assert run("--dagster-api") == ref
    code = (
        "import sys; from smallcaps_ingest import cli; "
        f"cli.main(['status', '--data-dir', {str(tree.data_dir)!r}]); "
        "print('dagster' in sys.modules, 'polars' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    assert proc.stdout.strip().splitlines()[-1] == "False False", proc.stdout


def test_lifetime_cache_of_the_wrong_shape_is_recomputed(tmp_path: Path) -> None:
    cache = tmp_path / "_state" / "status_cache.json"
    with dg.instance_for_test() as instance:
        materialize(instance, "AAA", events_written=1, errors_by_type={"429": 1})
        good = status.lifetime_totals(instance, str(cache))
        key = next(iter(json.loads(cache.read_text())))
        for bad in (
            {"materializations": "7"},
            {"errors_by_type": {"429": "many"}},
            {"errors_by_type": ["429"]},
            {"after_storage_id": "1"},
        ):
            entry = {**json.loads(cache.read_text())[key], **bad}
            cache.write_text(json.dumps({key: entry}))
            assert status.lifetime_totals(instance, str(cache)) == good, bad
        cache.write_text("{not json")
        assert status.lifetime_totals(instance, str(cache)) == good
