"""The ingestion report (core and asset), cleanup and reconcile (core, CLI and the Dagster job)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from dagster._core.test_utils import create_run_for_test
from dagster_polars import PolarsParquetIOManager

from smallcaps_ingest.core import store
from smallcaps_ingest.ops import cleanup, cli, reconcile, report, status
from smallcaps_ingest.pipeline.assets import symbols_partitions
from smallcaps_ingest.pipeline.jobs import cleanup_and_reconcile, ingestion_report
from smallcaps_ingest.pipeline.resources import IngestSettings
from smallcaps_ingest_tests.ops.test_status import EW, Tree, home, make_tree, materialize, quotes, trades

__all__ = ["home"]  # the fixture, shared with test_status


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return make_tree(tmp_path / "data")


def _ts(tree: Tree, symbol: str, which: str) -> datetime:
    col = tree.manifest.filter(pl.col("symbol") == symbol)["timestamp"]
    return (col.min() if which == "first" else col.max()).replace(tzinfo=UTC)  # type: ignore[union-attr]


def _data_files(tree: Tree) -> dict[str, tuple[int, int, str]]:
    out = {}
    for d, _, fs in os.walk(store.windows_root(tree.data_dir)):
        for f in fs:
            if f in store.FILES:
                p = os.path.join(d, f)
                st = os.stat(p)
                out[p] = (st.st_size, st.st_mtime_ns, hashlib.sha256(Path(p).read_bytes()).hexdigest())
    return out


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# --- the report ---------------------------------------------------------------------------------


def test_report_per_symbol_coverage_exact(tree: Tree) -> None:
    df = report.build_report(tree.data_dir, tree.manifest)
    assert dict(df.schema) == report.REPORT_SCHEMA
    rows = {r["symbol"]: r for r in df.iter_rows(named=True)}
    assert list(rows) == ["AAA", "BBB", "CCC", "DDD"]
    expect = {
        # events, complete, partial, missing, extra, empty, trades_rows, quotes_rows, rows, files, coverage
        "AAA": (5, 5, 0, 0, 0, 1, 4 * 3, 4 * 5, 32, 10, 1.0),
        "BBB": (4, 2, 1, 1, 1, 0, 2 * 2, 2 * 4, 12, 7, 0.5),
        "CCC": (3, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0.0),
        "DDD": (0, 0, 0, 0, 1, 0, 0, 0, 0, 2, None),
    }
    cols = [
        "events",
        "complete",
        "partial",
        "missing",
        "extra",
        "empty",
        "trades_rows",
        "quotes_rows",
        "rows",
        "files",
        "coverage",
    ]
    for sym, want in expect.items():
        assert tuple(rows[sym][c] for c in cols) == want, sym
        assert rows[sym]["bytes"] == tree.bytes_of(sym)
        assert rows[sym]["unreadable"] == 0
    for sym in ("AAA", "BBB", "CCC"):
        assert rows[sym]["first_event"] == _ts(tree, sym, "first")
        assert rows[sym]["last_event"] == _ts(tree, sym, "last")
    assert rows["DDD"]["first_event"] is None
    t = report.report_totals(df)
    assert (t["events"], t["complete"], t["partial"], t["missing"], t["extra"], t["empty"], t["rows"]) == (
        12,
        7,
        1,
        4,
        2,
        1,
        44,
    )
    assert (t["symbols"], t["symbols_complete"], t["symbols_on_disk_only"]) == (3, 1, 1)
    assert t["coverage_pct"] == pytest.approx(58.333) and t["bytes"] == tree.bytes_of()
    md = report.markdown_table(df, t)
    assert md.splitlines()[2].startswith("| **total (3 symbols, 1 complete)** | 12 | 7 | 1 | 4 | 1 | 44 |")
    assert md.splitlines()[3].startswith("| CCC | 3 | 0 | 0 | 3 |")  # least complete first


def test_report_row_counts_are_cached_by_size_and_mtime(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    first = report.build_report(tree.data_dir, tree.manifest)
    assert (tree.data_dir / "_reports" / report.ROWCOUNT_CACHE).is_file()
    calls: list[str] = []
    real = report._footer_rows

    def counting(path: str) -> int | None:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(report, "_footer_rows", counting)
    assert report.build_report(tree.data_dir, tree.manifest).equals(first)
    assert calls == []  # every footer came from the cache
    e = tree.ids["AAA"][0]  # the empty window gets data: only its two footers are read again
    store.write_event(tree.data_dir, "AAA", e, trades(7), quotes(1))
    again = report.build_report(tree.data_dir, tree.manifest)
    assert len(calls) == 2 and all(f"event={e}" in c for c in calls)
    aaa = again.filter(pl.col("symbol") == "AAA").row(0, named=True)
    assert (aaa["empty"], aaa["trades_rows"], aaa["quotes_rows"]) == (0, 12 + 7, 20 + 1)


def test_ingestion_report_asset(tree: Tree) -> None:
    with dg.instance_for_test() as instance:
        materialize(instance, "AAA", events_written=5, seconds=60.0)
        materialize(instance, "BBB", events_written=2, seconds=30.0)
        result = dg.materialize(
            [
                ingestion_report,
                dg.AssetSpec("manifest"),
                dg.AssetSpec("event_windows", partitions_def=symbols_partitions),
            ],
            selection=[ingestion_report],
            instance=instance,
            resources={
                "settings": IngestSettings(data_dir=str(tree.data_dir)),
                "io_manager": PolarsParquetIOManager(base_dir=str(tree.data_dir)),
            },
        )
        assert result.success
        mat = result.asset_materializations_for_node("ingestion_report")[0]
    md = {k: v.value for k, v in mat.metadata.items()}
    assert (md["events"], md["complete"], md["partial"], md["missing"], md["empty"], md["rows"]) == (
        12,
        7,
        1,
        4,
        1,
        44,
    )
    assert md["symbols"] == 3 and md["symbols_complete"] == 1 and md["dagster/row_count"] == 4
    assert md["report"].startswith("![coverage and throughput](data:image/png;base64,iVBORw0KGgo")
    assert "| **total (3 symbols, 1 complete)** | 12 | 7 |" in md["report"]
    pq_path, png = Path(md["parquet_path"]), Path(md["plot_path"])
    assert pq_path == tree.data_dir / "_reports" / "ingestion_report.parquet"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = pl.read_parquet(pq_path)
    assert written.equals(report.build_report(tree.data_dir, tree.manifest))


# --- cleanup ------------------------------------------------------------------------------------


def test_cleanup_removes_old_orphans_keeps_young_ones_and_data(tree: Tree) -> None:
    aaa, bbb, ccc = tree.orphans
    _age(aaa, 2 * 3600)
    _age(ccc, 90 * 60)
    manifest_tmp = tree.data_dir / "manifest.parquet.tmp.123"
    manifest_tmp.write_bytes(b"m")
    _age(manifest_tmp, 3 * 3600)
    before = _data_files(tree)
    with dg.instance_for_test() as instance:
        dry = cleanup.cleanup(str(tree.data_dir), instance, grace_minutes=60, dry_run=True)
        assert sorted(i["path"] for i in dry["would_remove"]) == sorted(
            os.path.relpath(p, tree.data_dir) for p in (aaa, ccc, manifest_tmp)
        )
        assert dry["removed"] == [] and aaa.exists()
        res = cleanup.cleanup(str(tree.data_dir), instance, grace_minutes=60)
    assert not res["refused"] and res["errors"] == []
    assert sorted(i["path"] for i in res["removed"]) == sorted(
        os.path.relpath(p, tree.data_dir) for p in (aaa, ccc, manifest_tmp)
    )
    assert res["removed_bytes"] == len(b"partial write") + len(b"yy") + 1
    assert [i["path"] for i in res["kept_young"]] == [os.path.relpath(bbb, tree.data_dir)]
    assert not aaa.exists() and not ccc.exists() and not manifest_tmp.exists() and bbb.exists()
    # CCC's event directory held only the interrupted write: removed with it; AAA's keeps its files
    assert res["removed_empty_event_dirs"] == [os.path.relpath(ccc.parent, tree.data_dir)]
    assert not ccc.parent.exists() and aaa.parent.is_dir()
    assert _data_files(tree) == before  # every data file untouched: same bytes, same mtime
    assert (tree.data_dir / "manifest.parquet").is_file()
    after = status.disk_summary(str(tree.data_dir))
    assert after["events"]["done"] == 7 and after["disk"]["tmp_orphans"] == 1


def test_cleanup_refuses_while_a_run_is_writing(
    tree: Tree, home: dg.DagsterInstance, capsys: pytest.CaptureFixture[str]
) -> None:
    for p in tree.orphans:
        _age(p, 2 * 3600)
    run = create_run_for_test(
        home, job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTED, asset_selection=frozenset({EW})
    )
    # a running checks-only or report job writes nothing to the tree: it does not block
    create_run_for_test(
        home,
        job_name="check_event_windows",
        status=dg.DagsterRunStatus.STARTED,
        asset_check_selection=frozenset({dg.AssetCheckKey(EW, "no_tmp_orphans")}),
    )
    assert cli.main(["cleanup", "--data-dir", str(tree.data_dir), "--json"]) == 1
    res = json.loads(capsys.readouterr().out)
    assert res["refused"] and [r["run_id"] for r in res["runs_in_progress"]] == [run.run_id]
    assert "refusing to clean up" in res["message"] and "--force" in res["message"]
    assert res["removed"] == [] and len(res["would_remove"]) == 3
    assert all(p.exists() for p in tree.orphans)
    assert cli.main(["cleanup", "--data-dir", str(tree.data_dir)]) == 1
    assert "refusing to clean up: 1 run(s)" in capsys.readouterr().err
    assert cli.main(["cleanup", "--data-dir", str(tree.data_dir), "--force", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["removed"]) == 3 and not any(p.exists() for p in tree.orphans)


def test_cleanup_without_an_instance_needs_force(
    tree: Tree, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    _age(tree.orphans[0], 2 * 3600)
    assert cli.main(["cleanup", "--data-dir", str(tree.data_dir)]) == 1
    assert "DAGSTER_HOME is not set" in capsys.readouterr().err and tree.orphans[0].exists()
    assert cli.main(["cleanup", "--data-dir", str(tree.data_dir), "--force", "--grace-minutes", "30"]) == 0
    assert "removed 1 tmp orphan(s) older than 30 min" in capsys.readouterr().out
    assert not tree.orphans[0].exists()


def test_cleanup_and_reconcile_job(tree: Tree) -> None:
    for p in tree.orphans:
        _age(p, 2 * 3600)
    resources = {"settings": IngestSettings(data_dir=str(tree.data_dir))}
    with dg.instance_for_test() as instance:
        run = create_run_for_test(
            instance, job_name="ingest_event_windows", status=dg.DagsterRunStatus.STARTING
        )
        blocked = cleanup_and_reconcile.execute_in_process(
            instance=instance, resources=resources, raise_on_error=False
        )
        assert not blocked.success
        failure = next(e for e in blocked.all_events if e.event_type_value == "STEP_FAILURE")
        assert failure.step_key == "cleanup_tmp_orphans" and "refusing to clean up" in failure.message + str(
            failure.event_specific_data.error
        )
        assert all(p.exists() for p in tree.orphans)
        # the reconcile op is independent of the cleanup: it ran
        assert any(
            e.step_key == "reconcile_partitions" and e.event_type_value == "STEP_SUCCESS"
            for e in blocked.all_events
        )
        instance.report_run_canceled(instance.get_run_by_id(run.run_id))
        ok = cleanup_and_reconcile.execute_in_process(
            instance=instance,
            resources=resources,
            run_config={"ops": {"reconcile_partitions": {"config": {"fix": True}}}},
        )
        assert ok.success
        outs = {
            e.step_key: e.event_specific_data.metadata
            for e in ok.all_events
            if e.event_type_value == "STEP_OUTPUT"
        }
        assert outs["cleanup_tmp_orphans"]["removed"].value == 3
        assert outs["reconcile_partitions"]["complete_not_materialized"].value == 1
        assert outs["reconcile_partitions"]["recorded_materializations"].value == 1
        assert outs["reconcile_partitions"]["foreign_events"].value == 2  # BBB's and DDD's extra ids
        assert all(store.event_dir(tree.data_dir, s, e).is_dir() for s, e in tree.extra_ids.items())
        assert not any(p.exists() for p in tree.orphans)
        assert instance.get_materialized_partitions(EW) == {"AAA"}


# --- reconcile ----------------------------------------------------------------------------------


def test_reconcile_both_directions_and_fix(tree: Tree) -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("symbols", ["BBB", "CCC"])
        materialize(
            instance, "BBB", events_total=4, events_written=4, seconds=10.0
        )  # but 2 events are not there
        res = reconcile.reconcile(str(tree.data_dir), instance)
        assert [r["symbol"] for r in res["materialized_incomplete"]] == ["BBB"]
        b = res["materialized_incomplete"][0]
        assert (b["events"], b["done"], b["partial"], b["missing"]) == (4, 2, 1, 1)
        assert [r["symbol"] for r in res["complete_not_materialized"]] == ["AAA"]
        assert res["complete_not_materialized"][0]["registered"] is False
        assert res["commands"] == [
            f"SMALLCAPS_DATA_DIR={tree.data_dir} dagster asset materialize -m smallcaps_ingest "
            "--select event_windows --partition BBB"
        ]
        assert res["fixed"] is None and instance.get_materialized_partitions(EW) == {"BBB"}

        fixed = reconcile.reconcile(str(tree.data_dir), instance, fix=True)["fixed"]
        assert fixed["recorded_materializations"] == ["AAA"] and fixed["registered_partitions"] == ["AAA"]
        assert fixed["needs_rematerialization"] == ["BBB"]
        assert fixed["method"] == "observation"  # SQLite storage cannot wipe partitions in Dagster 1.13
        assert "AAA" in instance.get_dynamic_partitions("symbols")
        assert instance.get_materialized_partitions(EW) == {"AAA", "BBB"}
        rec = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=EW, asset_partitions=["AAA"]), limit=1
        ).records[0]
        md = {k: v.value for k, v in rec.asset_materialization.metadata.items()}
        assert md["reconciled"] is True and md["events_total"] == 5 and md["events_complete"] == 5
        assert md["bytes"] == tree.bytes_of("AAA") and rec.run_id == ""
        obs = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=EW, asset_partitions=["BBB"]), limit=1
        ).records[0]
        omd = {k: v.value for k, v in obs.asset_observation.metadata.items()}
        assert (
            omd["needs_rematerialization"] is True
            and omd["events_missing"] == 1
            and omd["events_partial"] == 1
        )

        again = reconcile.reconcile(str(tree.data_dir), instance)
        assert again["complete_not_materialized"] == []
        assert [r["symbol"] for r in again["materialized_incomplete"]] == ["BBB"]  # still incomplete on disk
        # the reconciled materialization is no ingest work: status leaves it out of the rate
        st = status.collect_status(str(tree.data_dir), instance=instance)
        assert st["throughput"]["materializations"] == 1 and st["throughput"]["events_written"] == 4
        assert st["instance"]["reconciled_materializations"] == 1

        # BBB completed on disk: reconcile has nothing left to say about it
        store.write_event(tree.data_dir, "BBB", tree.ids["BBB"][2], trades(1), quotes(1))
        store.write_event(tree.data_dir, "BBB", tree.ids["BBB"][3], trades(1), quotes(1))
        final = reconcile.reconcile(str(tree.data_dir), instance)
        assert final["materialized_incomplete"] == [] and final["complete_not_materialized"] == []


def test_cli_reconcile(tree: Tree, home: dg.DagsterInstance, capsys: pytest.CaptureFixture[str]) -> None:
    home.add_dynamic_partitions("symbols", ["AAA", "BBB", "CCC"])
    materialize(home, "CCC", events_written=3)
    assert cli.main(["reconcile", "--data-dir", str(tree.data_dir), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["symbol"] for r in res["materialized_incomplete"]] == ["CCC"]
    assert [r["symbol"] for r in res["complete_not_materialized"]] == ["AAA"]
    assert cli.main(["reconcile", "--data-dir", str(tree.data_dir), "--fix"]) == 0
    out = capsys.readouterr().out
    assert "fixed: recorded 1 runless materialization(s)" in out and "--partition CCC" in out
    assert home.get_materialized_partitions(EW) == {"AAA", "CCC"}
    (tree.data_dir / "manifest.parquet").unlink()
    assert cli.main(["reconcile", "--data-dir", str(tree.data_dir)]) == 1
    assert "no manifest" in capsys.readouterr().err


def test_reconcile_fix_records_through_the_public_api_only(tree: Tree) -> None:
    """A reconciled materialization is a plain runless AssetMaterialization: its metadata (the counts
    status reads) and no hand-built provenance tags (those need Dagster's private modules)."""
    with dg.instance_for_test() as instance:
        fixed = reconcile.reconcile(str(tree.data_dir), instance, fix=True)["fixed"]
        assert fixed["recorded_materializations"] == ["AAA"]
        rec = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=EW, asset_partitions=["AAA"]), limit=1
        ).records[0]
        md = {k: v.value for k, v in rec.asset_materialization.metadata.items()}
        assert md == {"reconciled": True, "events_total": 5, "events_complete": 5, "files": 10,
                      "bytes": tree.bytes_of("AAA")}
        assert not any(k.startswith("dagster/input_") for k in (rec.event_log_entry.tags or {}))
        # status (from the instance) counts the reconciled partition complete
        st = status.collect_status(str(tree.data_dir), instance=instance)
        assert st["events"]["done"] == 5 and st["disk"]["bytes"] == tree.bytes_of("AAA")


def test_cleanup_marks_a_dead_run_failed_and_never_probes_where_it_cannot(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A STARTED run whose RUN_START process is gone is marked failed (report_run_failed); where a
    pid cannot be probed without harm (Windows: os.kill terminates), no run is taken for dead."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: no process has this pid now
    gone_pid = child.pid
    with dg.instance_for_test() as instance:
        run = create_run_for_test(instance, job_name="other_job", status=dg.DagsterRunStatus.STARTED)
        instance.report_dagster_event(
            dg.DagsterEvent(event_type_value="PIPELINE_START", job_name="other_job", pid=gone_pid),
            run.run_id,
        )
        monkeypatch.setattr(cleanup, "CAN_PROBE_PIDS", False)
        assert cleanup.fail_dead_runs(instance) == []
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        monkeypatch.undo()
        res = cleanup.cleanup(str(tree.data_dir), instance, grace_minutes=60)
        assert res["dead_runs_failed"] == [run.run_id]
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert "marked 1 dead run(s) failed" in cleanup.render_cleanup(res)
