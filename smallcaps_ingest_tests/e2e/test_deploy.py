"""One host in production, as deploy/Procfile says: exactly its processes (`dagster api grpc`,
`dagster-webserver`, `dagster-daemon` on deploy/workspace.yaml, talking over gRPC on loopback), on
the PostgreSQL instance of deploy/dagster.yaml in a database of the test's own, against the bundled
simulator on loopback. The manifest is materialized with the CLI, then a backfill of three symbols
of `event_windows` is launched through the webserver's GraphQL API and must succeed through the
daemon (backfill, run queue) and the code server (which launches the run); the three partitions are
materialized, their files on disk equal the simulator's ground truth, and the processes stop on
SIGTERM. The webserver and the daemon start before the code server, which must not matter.

Also: the instance the Dagster chart writes from deploy/helm/values.yaml, loaded by Dagster itself on
a database of its own, resolves to the same run queue, pool, monitoring and retries as
deploy/dagster.yaml (Dagster refuses some instances a values file can make the chart write:
dagster#31086, dagster#33225).

A missing PostgreSQL fails this test (connection refused), it never skips it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import yaml

from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import REPO, TEST_KEY, cli_env
from smallcaps_ingest_tests.deploy_helpers import DEPLOY, ProcfileHost, chart_instance
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
    code_port = free_port()
    web_port = next(p for p in iter(free_port, None) if p != code_port)
    with pg_database() as url, Simulator(SimConfig()) as sim:
        env = cli_env(
            tmp_path, POLYGON_BASE_URL=sim.base_url, POLYGON_API_KEY=TEST_KEY, POLYGON_MAX_RPS="40",
            SMALLCAPS_CODE_SERVER_PORT=str(code_port), SMALLCAPS_WEBSERVER_HOST="127.0.0.1",
            SMALLCAPS_WEBSERVER_PORT=str(web_port), PYTHONUNBUFFERED="1",
            **team_home(tmp_path / "home", url),
        )
        init_instance(env)  # README: once, before the first run
        t0 = time.monotonic()
        materialize(env, "--select", "manifest", "--config-json", IN_PROCESS)
        timings = {"manifest_cli": time.monotonic() - t0}
        t0 = time.monotonic()
        host = ProcfileHost(env, tmp_path)
        try:
            # the webserver and the daemon first, serving before the code server exists: both must
            # reach it by themselves once it serves (a code server restarted after an upgrade)
            host.start("webserver")
            host.start("daemon")
            host.wait_serving(timeout=120)
            host.start("codeserver")
            assert set(host.procs) == set(host.commands)  # every process of the Procfile, no other
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


# What a process on the instance resolves (Dagster's own reading of dagster.yaml), and a query
# of the storage (the database driver the URL or the scheme names must be installed).
RESOLVED = """
import json, dagster as dg
with dg.DagsterInstance.get() as i:
    c = i.get_concurrency_config()
    print(json.dumps({
        "max_concurrent_runs": c.run_queue_config.max_concurrent_runs,
        "pool": [c.pool_config.default_pool_limit, str(c.pool_config.pool_granularity)],
        "monitoring": [i.run_monitoring_enabled, i.run_monitoring_start_timeout_seconds,
                       i.run_monitoring_cancel_timeout_seconds, i.run_monitoring_poll_interval_seconds,
                       i.run_monitoring_max_resume_run_attempts,
                       i.run_monitoring_settings.get("free_slots_after_run_end_seconds")],
        "retries": [i.run_retries_enabled, i.run_retries_max_retries,
                    i.run_retries_retry_on_asset_or_op_failure],
        "runs": i.get_runs_count(),
    }))
"""


def _resolved(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", RESOLVED], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_chart_instance_resolves_like_deploy_dagster_yaml(tmp_path: Path) -> None:
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    with pg_database() as url:
        team = cli_env(tmp_path / "team", **team_home(tmp_path / "team" / "home", url))
        pg = {"hostname": "127.0.0.1", "username": "postgres", "db_name": url.rsplit("/", 1)[1],
              "port": 5432}
        chart_home = tmp_path / "chart"
        chart_home.mkdir()
        (chart_home / "dagster.yaml").write_text(yaml.safe_dump(chart_instance(values, pg)))
        chart = {**team, "DAGSTER_HOME": str(chart_home), "DAGSTER_PG_PASSWORD": ""}  # trust auth
        got = {}
        for name, env in (("deploy/dagster.yaml", team), ("chart", chart)):
            out = _resolved(env)
            assert out.returncode == 0, (name, out.stderr[-3000:])
            got[name] = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["chart"] == got["deploy/dagster.yaml"], got
        assert got["chart"]["max_concurrent_runs"] == 4 and got["chart"]["pool"][0] == 2, got

        # the two ways a chart's instance could go wrong here, each caught by Dagster itself:
        # the queue's limit also in run_coordinator (refused beside `concurrency`) ...
        values_both = {**values, "dagsterDaemon": {**values["dagsterDaemon"], "runCoordinator": {
            "enabled": True, "type": "QueuedRunCoordinator",
            "config": {"queuedRunCoordinator": {"maxConcurrentRuns": 4}}}}}
        (chart_home / "dagster.yaml").write_text(yaml.safe_dump(chart_instance(values_both, pg)))
        out = _resolved(chart)
        assert out.returncode != 0 and "max_concurrent_runs" in out.stderr, out.stderr[-2000:]
        # ... and a bare postgresql:// scheme (SQLAlchemy reads it as psycopg 3, not installed)
        bare = {**values, "postgresql": {**values["postgresql"], "postgresqlScheme": ""}}
        (chart_home / "dagster.yaml").write_text(yaml.safe_dump(chart_instance(bare, pg)))
        out = _resolved(chart)
        assert out.returncode != 0 and "psycopg" in out.stderr, out.stderr[-2000:]
