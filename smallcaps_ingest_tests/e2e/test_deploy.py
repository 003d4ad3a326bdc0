"""One host in production, as deploy/Procfile says: exactly its processes (`dagster api grpc`,
`dagster-webserver`, `dagster-daemon` on deploy/workspace.yaml, talking over gRPC on loopback), on
the PostgreSQL instance of deploy/dagster.yaml in a database of the test's own, against the bundled
simulator on loopback. The manifest is materialized with the CLI, then a backfill of three symbols
of `event_windows` is launched through the webserver's GraphQL API and must succeed through the
daemon (backfill, run queue) and the code server (which launches the run); the three partitions are
materialized, their files on disk equal the simulator's ground truth, and the processes stop on
SIGTERM.

A missing PostgreSQL fails this test (connection refused), it never skips it.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import polars as pl

from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import TEST_KEY, cli_env
from smallcaps_ingest_tests.deploy_helpers import ProcfileHost
from smallcaps_ingest_tests.resilience_helpers import assert_dataset_exact, materialize
from smallcaps_ingest_tests.team_helpers import (
    LOG_PROBLEMS,
    init_instance,
    materializations_per_partition,
    pg_database,
    team_home,
    team_instance,
)
from smallcaps_ingest_tests.ui_helpers import (
    free_port,
    launch_backfill,
    materialized_partitions,
    wait_backfill,
)

SYMBOLS = ["AAOI", "BBIG", "BRK.B"]  # adjacent partitions: the single-run policy makes one run
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})
STOP_TIMEOUT_S = 60.0


def test_procfile_host_runs_a_backfill(tmp_path: Path) -> None:
    with pg_database() as url, Simulator(SimConfig()) as sim:
        env = cli_env(
            tmp_path, POLYGON_BASE_URL=sim.base_url, POLYGON_API_KEY=TEST_KEY, POLYGON_MAX_RPS="40",
            SMALLCAPS_CODE_SERVER_PORT=str(free_port()), SMALLCAPS_WEBSERVER_HOST="127.0.0.1",
            SMALLCAPS_WEBSERVER_PORT=str(free_port()), PYTHONUNBUFFERED="1",
            **team_home(tmp_path / "home", url),
        )
        init_instance(env)  # README: once, before the first run
        t0 = time.monotonic()
        materialize(env, "--select", "manifest", "--config-json", IN_PROCESS)
        timings = {"manifest_cli": time.monotonic() - t0}
        t0 = time.monotonic()
        host = ProcfileHost(env, tmp_path)
        try:
            host.wait_ready(timeout=180)
            timings["ready"] = time.monotonic() - t0
            t0 = time.monotonic()
            backfill_id = launch_backfill(host, "event_windows", SYMBOLS, title="test_deploy")
            backfill, _ = wait_backfill(host, backfill_id, "event_windows", SYMBOLS, timeout=300)
            timings["backfill"] = time.monotonic() - t0
            assert sorted(materialized_partitions(host, "event_windows")) == SYMBOLS, backfill
        except BaseException:
            host.kill()
            raise
        t0 = time.monotonic()
        codes = host.stop(timeout=STOP_TIMEOUT_S)
        timings["stop"] = time.monotonic() - t0
        print("procfile host timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
        print(f"exit codes after SIGTERM: {codes}")
        # each ended on SIGTERM within the bound, its whole process group with it (sh -c reports
        # the signal, -15, or the command's own exit status)
        assert set(codes.values()) <= {0, -signal.SIGTERM}, f"{codes}\n{host.log_tail()}"

        runs = backfill["runs"]
        assert [r["status"] for r in runs] == ["SUCCESS"], runs  # one run for the three adjacent keys
        with team_instance(env) as instance:  # it went through the daemon's queue, then the code server
            record = instance.get_run_record_by_id(runs[0]["id"])  # type: ignore[attr-defined]
            assert record.dagster_run.tags.get("dagster/backfill") == backfill_id
            events = instance.get_records_for_run(runs[0]["id"]).records  # type: ignore[attr-defined]
            types = {e.event_log_entry.dagster_event.event_type_value for e in events
                     if e.event_log_entry.dagster_event}
            assert {"PIPELINE_ENQUEUED", "PIPELINE_STARTING", "PIPELINE_SUCCESS"} <= types, sorted(types)
        assert materializations_per_partition(env, SYMBOLS) == {s: 1 for s in SYMBOLS}

    data = Path(env["SMALLCAPS_DATA_DIR"])
    manifest = pl.read_parquet(data / "manifest.parquet")
    # exactly the three symbols' events on disk (nothing else fetched), each file exact
    assert assert_dataset_exact(data, manifest.filter(pl.col("symbol").is_in(SYMBOLS))) > 0
    for name, log in host.logs.items():
        text = log.read_text(errors="replace")
        assert not [p for p in LOG_PROBLEMS if p in text], (name, text[-3000:])
        assert TEST_KEY not in text, f"the API key is in the {name} log"
