"""The instance on PostgreSQL (deploy/dagster.yaml): four runs at once, two from the CLI and two
through the daemon's run queue, against a database of the test's own on the real server. The
polygon_api pool's limit is raised to 4 here so that all four fetch at the same time (with the
shipped limit of 2 the queue holds the daemon's runs until the CLI runs free their slots).

A missing PostgreSQL fails this test (connection refused), it never skips it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import REPO, TEST_KEY, cli_env
from smallcaps_ingest_tests.resilience_helpers import (
    assert_dataset_exact,
    kill_group,
    materialize,
    materialize_argv,
    smallcaps_ingest,
    write_events_subset,
)
from smallcaps_ingest_tests.team_helpers import (
    LOG_PROBLEMS,
    ConnectionPeak,
    daemon,
    init_instance,
    launch_range_proc,
    materializations_per_partition,
    pg_database,
    team_home,
    team_instance,
    wait_daemon_ready,
    wait_runs_finished,
    wait_runs_launched,
)

SYMBOLS = ["AAOI", "BBIG", "BRK.B", "CLOV", "DGLY", "FCEL", "GNUS", "IDEX"]
CLI_RANGES = (("AAOI", "BBIG"), ("BRK.B", "CLOV"))
QUEUED_RANGES = (("DGLY", "FCEL"), ("GNUS", "IDEX"))
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})


@pytest.fixture(scope="module")
def four_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("pg")
    events = tmp / "events.parquet"
    write_events_subset(events, SYMBOLS)
    # page_cap 500 at 40 req/s: ~70 s of fetching, so the four runs overlap despite each one's
    # ~20 s of process start-up on this shared 2-core machine
    with pg_database() as url, Simulator(SimConfig(latency_ms=10, page_cap=500)) as sim:
        env = cli_env(tmp, POLYGON_BASE_URL=sim.base_url, POLYGON_API_KEY=TEST_KEY, POLYGON_MAX_RPS="40",
                      SMALLCAPS_EVENTS=str(events), **team_home(tmp / "home", url, pool_limit=4))
        init_instance(env, pool_limit=4)
        materialize(env, "--select", "manifest", "--config-json", IN_PROCESS)
        logs: list[Path] = []
        with ConnectionPeak(url) as conns, daemon(env, tmp / "daemon.log") as d:
            wait_daemon_ready(tmp / "daemon.log", timeout=120)
            t0 = time.monotonic()
            procs = [launch_range_proc(env, first, last) for first, last in QUEUED_RANGES]
            # the daemon's queue ticks slowly at first on a loaded machine: start the CLI runs once
            # it has taken both queued runs, so that all four fetch at the same time
            wait_runs_launched(env, len(QUEUED_RANGES), timeout=240)
            for i, (first, last) in enumerate(CLI_RANGES):
                logs.append(tmp / f"cli{i}.log")
                with open(logs[-1], "wb") as out:
                    procs.append(subprocess.Popen(
                        materialize_argv("--select", "event_windows", "--partition-range",
                                         f"{first}...{last}"),
                        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    ))
            try:
                rcs = [p.wait(timeout=300) for p in procs]
                runs = wait_runs_finished(env, 1 + len(CLI_RANGES) + len(QUEUED_RANGES), timeout=300)
                print(f"postgres: four runs done {time.monotonic() - t0:.1f}s after the start")
            finally:
                for p in procs:
                    if p.poll() is None:
                        kill_group(p)
            assert d.poll() is None, "the daemon died"
        logs.append(tmp / "daemon.log")
        yield {"env": env, "rcs": rcs, "runs": runs, "logs": logs, "peak": conns.peak, "url": url}


def test_four_concurrent_runs_on_postgres(four_runs: dict) -> None:
    env, runs = four_runs["env"], four_runs["runs"]
    assert four_runs["rcs"] == [0, 0, 0, 0], [p.read_text()[-3000:] for p in four_runs["logs"][:2]]
    assert sorted(r.status.value for r in runs) == ["SUCCESS"] * 5, [(r.status.value, r.tags) for r in runs]
    queued = [r for r in runs if "dagster/asset_partition_range_start" in r.tags and r.job_name ==
              "ingest_event_windows"]
    assert len(queued) == 2  # the two runs the daemon took off the queue and launched
    with team_instance(env) as instance:
        spans = sorted((rec.start_time or 0, rec.end_time or 0, rec.dagster_run.job_name)
                       for rec in instance.get_run_records())  # type: ignore[attr-defined]
    t0 = spans[0][0]
    print("postgres runs (start, end) s:", [(round(a - t0, 1), round(b - t0, 1), j[:9]) for a, b, j in spans])
    runs4 = spans[1:]  # after the manifest: the four runs were running at the same moment
    assert max(a for a, _, _ in runs4) < min(b for _, b, _ in runs4), spans
    with team_instance(env) as instance:  # the queue's runs went through the daemon: they were QUEUED
        for r in queued:
            events = instance.get_records_for_run(r.run_id).records  # type: ignore[attr-defined]
            types = [e.event_log_entry.dagster_event.event_type_value for e in events
                     if e.event_log_entry.dagster_event]
            assert "PIPELINE_ENQUEUED" in types and "PIPELINE_STARTING" in types, ",".join(sorted(set(types)))
    assert materializations_per_partition(env, SYMBOLS) == {s: 1 for s in SYMBOLS}  # each recorded once
    data = Path(env["SMALLCAPS_DATA_DIR"])
    assert_dataset_exact(data, pl.read_parquet(data / "manifest.parquet"))
    for log in four_runs["logs"]:
        text = log.read_text(errors="replace")
        assert not [p for p in LOG_PROBLEMS if p in text], (log.name, text[-3000:])
    # dagster-postgres opens connections per operation (NullPool): the four runs, their step
    # processes, the daemon and its code server stayed far below the server's max_connections (100)
    print(f"postgres: peak {four_runs['peak']} connections to the test database")
    assert four_runs["peak"] < 60, four_runs["peak"]


def test_status_reads_a_postgres_instance(four_runs: dict) -> None:
    """`status` falls back to the Dagster API for storage other than the default SQLite files."""
    env = four_runs["env"]
    t = time.monotonic()
    out = smallcaps_ingest(env, "status", "--json")
    took = time.monotonic() - t
    assert out.returncode == 0, out.stderr[-3000:]
    status = json.loads(out.stdout)
    print(f"status on postgres: {took:.2f}s")
    inst = status["instance"]
    assert inst["present"] and inst["materialized_partitions"] == 8, inst
    assert status["symbols"]["complete"] == 8 and status["events"]["partial"] == 0
