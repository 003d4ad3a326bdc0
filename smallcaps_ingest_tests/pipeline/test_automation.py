"""The daily flow on its own (issue 21, part 3): with SMALLCAPS_AUTOMATION=on and the daemon running,
a change to the events file re-materializes the manifest and only the event_windows partitions
whose events changed; nothing else is fetched. Off by default."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import dagster as dg
import polars as pl

from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import REPO, TEST_KEY, cli_env
from smallcaps_ingest_tests.resilience_helpers import cli_instance, materialize, write_events_subset
from smallcaps_ingest_tests.team_helpers import daemon

INITIAL = ["AAOI", "BBIG", "CLOV"]
NEW = "KOSS"  # a symbol not in the initial events
EXISTING = "BBIG"  # gets one more event
WAIT = 240  # seconds: generous, the machine is shared


def _window_records(instance: dg.DagsterInstance, after: int | None) -> list[dg.EventLogRecord]:
    return list(
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("event_windows"), after_storage_id=after), limit=1000
        ).records
    )


def _busy(instance: dg.DagsterInstance) -> bool:
    busy = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
            dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
    return bool(instance.get_runs(filters=dg.RunsFilter(statuses=busy), limit=1))


def test_events_change_materializes_only_changed_partitions(tmp_path: Path) -> None:
    events = tmp_path / "events.parquet"
    initial = write_events_subset(events, INITIAL)
    with Simulator(SimConfig()) as sim:
        env = cli_env(
            tmp_path,
            POLYGON_BASE_URL=sim.base_url,
            POLYGON_API_KEY=TEST_KEY,
            POLYGON_MAX_RPS="200",
            POLYGON_BUDGET_PATH=str(tmp_path / "budget.sqlite"),
            SMALLCAPS_EVENTS=str(events),
            SMALLCAPS_AUTOMATION="on",
            SMALLCAPS_AUTOMATION_INTERVAL="5",
        )
        materialize(env, "--select", "manifest")
        materialize(env, "--select", "event_windows", "--partition-range", f"{INITIAL[0]}...{INITIAL[-1]}")
        with cli_instance(env) as inst:
            instance: dg.DagsterInstance = inst  # type: ignore[assignment]
            before = _window_records(instance, None)
            assert {r.partition_key for r in before} == set(INITIAL)
            mark = instance.event_log_storage.get_maximum_record_id()
            with daemon(env, tmp_path / "daemon.log"):
                # let the sensors take their first look at the unchanged file: it must start nothing
                # (the first observation of the file is its first version: the manifest may re-run
                # once, and must fetch nothing)
                time.sleep(30)
                while _busy(instance):
                    time.sleep(1)
                assert _window_records(instance, mark) == []
                mark = instance.event_log_storage.get_maximum_record_id()
                sim.reset_counters()
                # append: all of KOSS's events (a new symbol) and one more BBIG event (an existing one)
                add = write_events_subset(tmp_path / "add.parquet", [NEW])
                extra = initial.filter(pl.col("symbol") == EXISTING).head(1)
                extra = extra.with_columns(pl.col("timestamp") + timedelta(minutes=30))
                tmp = tmp_path / "events.tmp.parquet"
                pl.concat([initial, add, extra], how="vertical_relaxed").write_parquet(tmp)
                os.replace(tmp, events)  # whole file or nothing, as a user's export would land
                deadline = time.monotonic() + WAIT
                while time.monotonic() < deadline:
                    got = {r.partition_key for r in _window_records(instance, mark)}
                    if {NEW, EXISTING} <= got and not _busy(instance):
                        break
                    time.sleep(2)
                time.sleep(15)  # three more sensor intervals: no late run for any other symbol
                assert not _busy(instance)
                after = _window_records(instance, mark)
                log = (tmp_path / "daemon.log").read_text(errors="replace")
                assert sorted(r.partition_key for r in after) == sorted([NEW, EXISTING]), log[-4000:]
                manifests = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=dg.AssetKey("manifest"), after_storage_id=mark), limit=10
                ).records
                assert len(manifests) == 1
                tickers = {r.ticker for r in sim.request_log()}
                assert tickers == {NEW, EXISTING}
                # the events file's observation carries the new content hash
                from smallcaps_ingest.pipeline.automation import file_version

                obs = instance.fetch_observations(dg.AssetKey("events_file"), limit=1).records
                assert obs[0].asset_observation.tags["dagster/data_version"] == file_version(str(events))
                assert TEST_KEY not in log


def _statuses(**env: str) -> str:
    code = (
        "from smallcaps_ingest import defs; "
        "print(sorted((s.name, s.default_status.value) for s in defs.sensors))"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("SMALLCAPS_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO, env={**base, **env}, capture_output=True, text=True, check=True,
    ).stdout.strip()


def test_switch_off_by_default_on_when_asked() -> None:
    off = "[('events_file_sensor', 'STOPPED'), ('smallcaps_automation', 'STOPPED')]"
    assert _statuses() == off
    assert _statuses(SMALLCAPS_AUTOMATION="off") == off
    assert _statuses(SMALLCAPS_AUTOMATION="on") == off.replace("STOPPED", "RUNNING")


def test_change_during_a_manifest_run_is_not_lost(tmp_path: Path) -> None:
    """The file changes while a manifest run reads it: the sensor observes the new content, the run
    finishes after that with the old content, and the conditions count that run as handling the
    change. The sensor sees a manifest recorded after the observation lag the file and asks for one
    more manifest run. It asks for none while the observation is newer than the manifest (the
    conditions have not reacted yet), nor once the manifest has read the current content."""
    from smallcaps_ingest.config import Config
    from smallcaps_ingest.pipeline.automation import automation_sensors, file_version, manifest_read_version
    from smallcaps_ingest.pipeline.resources import IngestSettings

    events_file_sensor = automation_sensors(Config())[1]
    events = tmp_path / "events.parquet"
    initial = write_events_subset(events, INITIAL)
    env = cli_env(tmp_path, POLYGON_BASE_URL="simulator", SMALLCAPS_EVENTS=str(events))
    settings = IngestSettings(data_dir=str(tmp_path / "data"), events_path=str(events))
    materialize(env, "--select", "manifest")
    v1 = file_version(str(events))
    changed = pl.concat([initial, write_events_subset(tmp_path / "add.parquet", [NEW])])
    changed.write_parquet(tmp_path / "v2.parquet")
    v2 = file_version(str(tmp_path / "v2.parquet"))
    assert v2 != v1

    def tick(cursor: str) -> dg.SensorResult | dg.SkipReason:
        with cli_instance(env) as inst:
            ctx = dg.build_sensor_context(instance=inst, cursor=cursor, resources={"settings": settings})
            return events_file_sensor(ctx)  # type: ignore[return-value]

    # the file changes: the first look observes it and requests nothing (the conditions do)
    os.replace(tmp_path / "v2.parquet", events)
    first = tick(v1)
    assert isinstance(first, dg.SensorResult) and not first.run_requests
    assert [e.tags["dagster/data_version"] for e in first.asset_events] == [v2]
    with cli_instance(env) as inst:
        inst.report_runless_asset_event(first.asset_events[0])  # what the daemon records
    # next tick, the manifest is older than the observation: still the conditions' turn
    assert isinstance(tick(v2), dg.SkipReason)
    # the race: a manifest run that read the old content is recorded after the observation
    write_events_subset(events, INITIAL)
    materialize(env, "--select", "manifest")
    changed.write_parquet(events)
    with cli_instance(env) as inst:
        assert manifest_read_version(inst)[0] == v1  # type: ignore[arg-type]
    late = tick(v2)
    assert isinstance(late, dg.SensorResult), late
    assert [r.run_key for r in late.run_requests] == [f"manifest-{v2}"] and not late.asset_events
    # once a manifest has read the current content, nothing more
    materialize(env, "--select", "manifest")
    assert isinstance(tick(v2), dg.SkipReason)
