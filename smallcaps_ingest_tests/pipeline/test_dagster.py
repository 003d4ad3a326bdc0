"""The Dagster project: definitions, the IO manager pin, and end-to-end runs through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from smallcaps_ingest.core import shape, store
from smallcaps_ingest.core.engine import windows_from_frame
from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import BIN, REPO, TEST_KEY, cli_env, truth_frame

CHECK_NAMES = {
    "no_partial_events",
    "no_missing_events",
    "no_tmp_orphans",
    "timestamps_in_window",
    "rows_sorted",
    "sequence_unique",
    "quotes_bid_le_ask",
    "schema_as_documented",
}


def dagster(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BIN / "dagster"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if ok and proc.returncode != 0:
        raise AssertionError(
            f"dagster {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def materialize(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return dagster(env, "asset", "materialize", "-m", "smallcaps_ingest", *args, ok=ok)


def _instance(env: dict[str, str]) -> dg.DagsterInstance:
    """The CLI's instance, opened the way the CLI opens it (dagster.yaml reads DAGSTER_HOME)."""
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    return dg.DagsterInstance.from_config(env["DAGSTER_HOME"])


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        yield s


@pytest.fixture
def env(tmp_path: Path, sim: Simulator) -> dict[str, str]:
    return cli_env(
        tmp_path,
        POLYGON_BASE_URL=sim.base_url,
        POLYGON_API_KEY=TEST_KEY,
        POLYGON_MAX_RPS="200",
        POLYGON_BUDGET_PATH=str(tmp_path / "budget.sqlite"),
    )


def test_definitions_graph() -> None:
    from smallcaps_ingest import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {
        "events_file", "manifest", "symbol_events", "event_windows", "ingestion_report", "compacted_windows"
    }
    assert {p.to_user_string() for p in graph.get(dg.AssetKey("manifest")).parent_keys} == {"events_file"}
    assert graph.get(dg.AssetKey("events_file")).is_observable
    assert graph.get(dg.AssetKey("manifest")).automation_condition is not None
    assert graph.get(dg.AssetKey("event_windows")).automation_condition is not None
    # off by default: the automation and observation sensors never start on their own
    assert {s.name: s.default_status for s in defs.sensors} == {
        "smallcaps_automation": dg.DefaultSensorStatus.STOPPED,
        "events_file_sensor": dg.DefaultSensorStatus.STOPPED,
    }
    compacted = graph.get(dg.AssetKey("compacted_windows"))
    assert dg.AssetKey("event_windows") in compacted.parent_keys
    assert compacted.partitions_def == graph.get(dg.AssetKey("event_windows")).partitions_def
    report = graph.get(dg.AssetKey("ingestion_report"))
    assert dg.AssetKey("event_windows") in report.parent_keys
    windows = graph.get(dg.AssetKey("event_windows"))
    assert {p.to_user_string() for p in windows.parent_keys} == {"manifest", "symbol_events"}
    assert graph.get(dg.AssetKey("symbol_events")).partitions_def == windows.partitions_def
    assert isinstance(windows.partitions_def, dg.DynamicPartitionsDefinition)
    assert windows.partitions_def.name == "symbols"
    assert windows.backfill_policy == dg.BackfillPolicy.single_run()
    assets_def = defs.resolve_assets_def("event_windows")
    assert assets_def.op.pool == "polygon_api"
    checks = {k.name for k in graph.asset_check_keys if k.asset_key == dg.AssetKey("event_windows")}
    assert checks == CHECK_NAMES
    assert graph.get(dg.AssetKey("manifest")).partitions_def is None
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {"ingest_event_windows", "check_event_windows", "cleanup_and_reconcile"} <= jobs
    assert set(defs.resources) >= {"polygon", "settings", "io_manager"}


def test_manifest_loads_through_the_polars_io_manager(tmp_path: Path, sim: Simulator) -> None:
    """Catches the dagster-polars / polars 2.x pin: event_windows loads manifest via the IO manager."""
    from dagster_polars import PolarsParquetIOManager

    from smallcaps_ingest.pipeline.assets import event_windows, manifest
    from smallcaps_ingest.pipeline.resources import IngestSettings, PolygonResource
    from smallcaps_ingest.simulator.sample import SAMPLE_EVENTS_PATH

    data = tmp_path / "data"
    resources = {
        "io_manager": PolarsParquetIOManager(base_dir=str(data)),
        "settings": IngestSettings(data_dir=str(data), events_path=str(SAMPLE_EVENTS_PATH)),
        "polygon": PolygonResource(
            api_key=TEST_KEY, base_url=sim.base_url, max_rps=500, budget_url=f"sqlite://{tmp_path}/b.sqlite"
        ),
    }
    with dg.instance_for_test() as instance:
        r1 = dg.materialize([manifest], resources=resources, instance=instance)
        assert r1.success
        assert (data / "manifest.parquet").exists()
        df = r1.output_for_node("manifest")
        assert df.height == 300 and df.columns[:7] == [
            "event_id",
            "symbol",
            "event_type",
            "timestamp",
            "ts_start",
            "ts_end",
            "session",
        ]
        assert instance.get_dynamic_partitions("symbols")[:3] == ["AAOI", "BBIG", "BRK.B"]
        # event_windows gets its `manifest` input from PolarsParquetIOManager (scan_parquet + collect)
        r2 = dg.materialize(
            [manifest, event_windows],
            selection=[event_windows],
            partition_key="XELB",
            resources=resources,
            instance=instance,
        )
        assert r2.success
        (mat,) = r2.asset_materializations_for_node("event_windows")
        assert mat.metadata["events_total"].value == 10 == mat.metadata["events_complete"].value


def _assert_symbol_exact(data: Path, symbol: str, manifest: pl.DataFrame) -> int:
    ws = windows_from_frame(manifest.filter(pl.col("symbol") == symbol))
    for w in ws:
        d = store.event_dir(data, symbol, w.event_id)
        got_t = pl.read_parquet(d / "trades.parquet")
        got_q = pl.read_parquet(d / "quotes.parquet")
        want_t = shape.shape_trades(truth_frame("trades", symbol, w.start_ns, w.end_ns), w.start_ns, w.end_ns)
        want_q = shape.shape_quotes(
            truth_frame("quotes", symbol, w.start_ns, w.end_ns), w.start_ns, w.end_ns, 1.0
        )
        assert got_t.equals(want_t), (symbol, w.event_id)
        assert got_q.equals(want_q), (symbol, w.event_id)
    return len(ws)


def _check_status(instance: dg.DagsterInstance) -> dict[tuple[str, str], str]:
    keys = [dg.AssetCheckKey(dg.AssetKey("event_windows"), n) for n in CHECK_NAMES]
    return {
        (i.check_key.name, i.partition_key): i.latest_execution_status.value
        for i in instance.event_log_storage.get_asset_check_partition_info(keys)
    }


def test_cli_end_to_end_resume_and_checks(env: dict[str, str], sim: Simulator, tmp_path: Path) -> None:
    data = Path(env["SMALLCAPS_DATA_DIR"])
    out = materialize(env, "--select", "manifest")
    manifest = pl.read_parquet(data / "manifest.parquet")
    assert manifest.height == 300
    materialize(env, "--select", "event_windows", "--partition", "AAOI")
    assert sim.counters()["total"] > 0
    materialize(env, "--select", "event_windows", "--partition-range", "BBIG...CLOV")  # BBIG, BRK.B, CLOV
    instance = _instance(env)
    assert instance.get_materialized_partitions(dg.AssetKey("event_windows")) == {
        "AAOI",
        "BBIG",
        "BRK.B",
        "CLOV",
    }
    events = sum(_assert_symbol_exact(data, s, manifest) for s in ("AAOI", "BBIG", "BRK.B", "CLOV"))
    assert events == 20 + 22 + 14 + 24
    status = _check_status(instance)
    for sym in ("AAOI", "BBIG", "BRK.B", "CLOV"):
        for name in CHECK_NAMES:
            assert status[(name, sym)] == "SUCCEEDED", (name, sym)
    # per-symbol materialization metadata from the multi-symbol run
    rec = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("event_windows"), asset_partitions=["BRK.B"]), limit=1
    ).records[0]
    meta = rec.asset_materialization.metadata
    assert meta["events_total"].value == 14 == meta["events_complete"].value
    assert meta["requests"].value > 0 and meta["events_per_min"].value > 0

    # resume: delete one file; only that event is requested again, counted at the simulator
    victim = windows_from_frame(manifest.filter(pl.col("symbol") == "AAOI"))[5]
    (store.event_dir(data, "AAOI", victim.event_id) / "trades.parquet").unlink()
    sim.reset_counters()
    materialize(env, "--select", "event_windows", "--partition", "AAOI")
    log = sim.request_log()
    assert len(log) == 2 and {(r.endpoint, r.gte_ns, r.lt_ns) for r in log} == {
        ("trades", victim.start_ns, victim.end_ns),
        ("quotes", victim.start_ns, victim.end_ns),
    }
    _assert_symbol_exact(data, "AAOI", manifest)

    # the checks alone: no download, and they see a partial event
    (
        store.event_dir(
            data, "CLOV", windows_from_frame(manifest.filter(pl.col("symbol") == "CLOV"))[0].event_id
        )
        / "quotes.parquet"
    ).unlink()
    sim.reset_counters()
    dagster(
        env,
        "job",
        "execute",
        "-m",
        "smallcaps_ingest",
        "-j",
        "check_event_windows",
        "--tags",
        json.dumps({"dagster/partition": "CLOV"}),
    )
    assert sim.counters()["total"] == 0
    status = _check_status(_instance(env))
    assert status[("no_partial_events", "CLOV")] == "FAILED"
    assert status[("no_missing_events", "CLOV")] == "FAILED"
    assert status[("rows_sorted", "CLOV")] == "SUCCEEDED"

    # the key is nowhere: not in the instance, the data, the logs
    blobs = [out.stdout, out.stderr]
    for root in (Path(env["DAGSTER_HOME"]), data):
        blobs += [p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file()]
    assert not any(TEST_KEY in b for b in blobs)


def test_partial_failure_keeps_completed_symbols(env: dict[str, str]) -> None:
    data = Path(env["SMALLCAPS_DATA_DIR"])
    materialize(env, "--select", "manifest")
    (data / "event_windows").mkdir(parents=True, exist_ok=True)
    (data / "event_windows" / "symbol=BRK.B").write_text("a file where a directory belongs")
    proc = materialize(env, "--select", "event_windows", "--partition-range", "AAOI...CLOV", ok=False)
    assert proc.returncode != 0
    assert "1 of 4 symbols failed: BRK.B" in proc.stdout + proc.stderr
    assert _instance(env).get_materialized_partitions(dg.AssetKey("event_windows")) == {
        "AAOI",
        "BBIG",
        "CLOV",
    }


def test_no_key_stops_before_any_request(env: dict[str, str], sim: Simulator) -> None:
    materialize(env, "--select", "manifest")
    no_key = {k: v for k, v in env.items() if k != "POLYGON_API_KEY"}
    proc = materialize(no_key, "--select", "event_windows", "--partition", "AAOI", ok=False)
    assert proc.returncode != 0
    assert "POLYGON_API_KEY is not set" in proc.stdout + proc.stderr
    assert sim.counters()["total"] == 0
    assert not (Path(env["SMALLCAPS_DATA_DIR"]) / "event_windows").exists()


def test_simulated_data_never_mixes_with_real(env: dict[str, str], sim: Simulator) -> None:
    data = Path(env["SMALLCAPS_DATA_DIR"])
    materialize(env, "--select", "manifest")
    # a tree of the bundled simulator; POLYGON_BASE_URL is a URL here, so the run's source is "polygon"
    (data / "_source.json").write_text(json.dumps({"source": "simulator"}))
    proc = materialize(env, "--select", "event_windows", "--partition", "AAOI", ok=False)
    assert "simulated and real data must never mix" in proc.stdout + proc.stderr
    assert not (data / "event_windows").exists() or not any((data / "event_windows").rglob("*.parquet"))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pl.DataFrame({"symbol": ["AAOI"], "event_type": ["news"]}), "timestamp"),
        (
            pl.DataFrame(
                {
                    "symbol": ["../etc"],
                    "event_type": ["news"],
                    "timestamp": pl.Series(["2024-03-05 15:00:00"]).str.to_datetime(time_zone="UTC"),
                }
            ),
            "../etc",
        ),
        (
            pl.DataFrame(
                {
                    "symbol": ["AAOI"],
                    "event_type": ["news"],
                    "timestamp": pl.Series(["2024-03-05 15:00:00"]).str.to_datetime(),
                }
            ),
            "time zone",
        ),
    ],
)
def test_bad_events_fail_clearly_and_write_nothing(tmp_path: Path, frame: pl.DataFrame, message: str) -> None:
    bad = tmp_path / "bad.parquet"
    frame.write_parquet(bad)
    env = cli_env(tmp_path, POLYGON_BASE_URL="simulator", SMALLCAPS_EVENTS=str(bad))
    proc = materialize(env, "--select", "manifest", ok=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not Path(env["SMALLCAPS_DATA_DIR"]).exists() or not any(Path(env["SMALLCAPS_DATA_DIR"]).iterdir())


def test_bad_environment_is_named(tmp_path: Path) -> None:
    env = cli_env(tmp_path, POLYGON_BASE_URL="simulator", POLYGON_MAX_RPS="fast")
    proc = materialize(env, "--select", "manifest", ok=False)
    assert "POLYGON_MAX_RPS='fast' is not a valid float" in proc.stdout + proc.stderr


def _stale(env: dict[str, str], partition: str) -> str:
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    from smallcaps_ingest import defs

    instance = _instance(env)
    graph = defs.resolve_asset_graph()
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
    return resolver.get_status(dg.AssetKey("event_windows"), partition).value


def _two_symbols(tmp_path: Path, env: dict[str, str]) -> tuple[dict[str, str], Callable[[], None]]:
    """An events file of AAOI and BBIG with the manifest materialized; and a function that adds
    one AAOI event to the file and re-materializes the manifest."""
    from smallcaps_ingest.core.events import read_events
    from smallcaps_ingest.simulator.sample import SAMPLE_EVENTS_PATH

    events = read_events(SAMPLE_EVENTS_PATH).filter(pl.col("symbol").is_in(["AAOI", "BBIG"]))
    path = tmp_path / "events.parquet"
    events.write_parquet(path)
    env = {**env, "SMALLCAPS_EVENTS": str(path)}
    materialize(env, "--select", "manifest")

    def add_aaoi_event() -> None:
        later = (pl.col("timestamp") + pl.duration(hours=1, seconds=7)).cast(events.schema["timestamp"])
        extra = events.filter(pl.col("symbol") == "AAOI").head(1).with_columns(later)
        pl.concat([events, extra]).write_parquet(path)
        materialize(env, "--select", "manifest")

    return env, add_aaoi_event


def _stale_aaoi_fetches_only_its_new_event(env: dict[str, str], sim: Simulator) -> None:
    assert _stale(env, "AAOI") == "STALE"
    assert _stale(env, "BBIG") == "FRESH"  # its events did not change
    sim.reset_counters()
    materialize(env, "--select", "event_windows", "--partition", "AAOI")
    assert sim.counters()["total"] == 2  # trades + quotes of the one new event
    assert _stale(env, "AAOI") == "FRESH"


def test_changed_symbol_turns_stale_and_fetches_only_new_events(
    tmp_path: Path, sim: Simulator, env: dict[str, str]
) -> None:
    env, add_aaoi_event = _two_symbols(tmp_path, env)
    materialize(env, "--select", "event_windows", "--partition-range", "AAOI...BBIG")
    assert _stale(env, "AAOI") == _stale(env, "BBIG") == "FRESH"
    add_aaoi_event()
    _stale_aaoi_fetches_only_its_new_event(env, sim)


def test_manifest_changed_during_a_range_run_leaves_the_changed_symbol_stale(
    tmp_path: Path, sim: Simulator, env: dict[str, str]
) -> None:
    """A range run records each symbol's provenance as of the manifest it loaded: AAOI's events
    change while the run fetches the old ones, so AAOI must end stale (its new event unfetched)."""
    import time

    env, add_aaoi_event = _two_symbols(tmp_path, env)
    sim.config.latency_ms = 10_000  # the run's first requests stay in flight while the manifest changes
    log = tmp_path / "range_run.log"
    with log.open("w") as out:  # a file, not a pipe: nobody reads a pipe while the manifest runs
        proc = subprocess.Popen(
            [str(BIN / "dagster"), "asset", "materialize", "-m", "smallcaps_ingest", "--select",
             "event_windows", "--partition-range", "AAOI...BBIG"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while sim.counters()["total"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sim.counters()["total"] >= 1, "the run made no request"
    add_aaoi_event()
    sim.config.latency_ms = 0
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    instance = _instance(env)
    manifest_v2 = instance.fetch_materializations(dg.AssetKey("manifest"), limit=1).records[0]
    aaoi = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("event_windows"), asset_partitions=["AAOI"]), limit=1
    ).records[0]
    assert manifest_v2.storage_id < aaoi.storage_id  # the scenario: recorded after the manifest changed
    _stale_aaoi_fetches_only_its_new_event(env, sim)


def test_cleanup_fails_killed_runs_and_frees_their_pool_slots(env: dict[str, str], sim: Simulator) -> None:
    """kill -9 leaves an in-process CLI run STARTED holding a polygon_api slot; cleanup recovers it."""
    import signal
    import time

    materialize(env, "--select", "manifest")
    sim.config.latency_ms = 300
    proc = subprocess.Popen(
        [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "smallcaps_ingest",
            "--select",
            "event_windows",
            "--partition-range",
            "AAOI...CLOV",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while sim.counters()["total"] < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    instance = _instance(env)
    (run,) = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    assert instance.event_log_storage.get_concurrency_info("polygon_api").claimed_slots
    out = subprocess.run(
        [str(BIN / "smallcaps-ingest"), "cleanup", "--grace-minutes", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "marked 1 dead run(s) failed" in out.stdout
    instance = _instance(env)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert not instance.event_log_storage.get_concurrency_info("polygon_api").claimed_slots
    assert not list(Path(env["SMALLCAPS_DATA_DIR"]).rglob("*.tmp*"))
    sim.config.latency_ms = 0
    materialize(env, "--select", "event_windows", "--partition-range", "AAOI...CLOV")


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, "32 None"),  # 90 req/s: 0.4 s x 90 = 36, at most 32; allowance from the budget at run time
        ({"POLYGON_MAX_RPS": "10"}, "12 None"),  # never fewer than 12
        ({"POLYGON_MAX_RPS": "50", "SMALLCAPS_OVERFETCH_ROWS": "0"}, "20 0"),
        ({"POLYGON_WORKERS": "7", "SMALLCAPS_OVERFETCH_ROWS": "auto"}, "7 None"),
    ],
)
def test_worker_and_allowance_defaults_follow_the_budget(env: dict[str, str], want: str) -> None:
    code = (
        "from smallcaps_ingest.definitions import polygon as p, settings as s; "
        "print(p.workers, s.overfetch_rows)"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "SMALLCAPS_"))}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == want
