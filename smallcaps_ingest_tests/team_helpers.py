"""Helpers for the team-scale tests: a database of the test's own on the real PostgreSQL
(127.0.0.1:5432, user postgres, trust), instances on deploy/dagster.yaml, the daemon, and the
connection count at the server. A missing server fails the test (connection refused)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg2
import redis

from smallcaps_ingest_tests.conftest import BIN, REPO, cli_env
from smallcaps_ingest_tests.resilience_helpers import cli_instance, kill_group

PG = "postgresql+psycopg2://postgres@127.0.0.1:5432"
LOG_PROBLEMS = ("database is locked", "too many clients", "remaining connection slots", "OperationalError")


@contextlib.contextmanager
def team_instance(env: Mapping[str, str]) -> Iterator[dg.DagsterInstance]:
    """The instance a host with `env` opens (deploy/dagster.yaml reads DAGSTER_PG_URL)."""
    old = os.environ.get("DAGSTER_PG_URL")
    os.environ["DAGSTER_PG_URL"] = env["DAGSTER_PG_URL"]
    try:
        with cli_instance(env) as instance:
            yield instance  # type: ignore[misc]
    finally:
        if old is None:
            os.environ.pop("DAGSTER_PG_URL", None)
        else:
            os.environ["DAGSTER_PG_URL"] = old


def _admin():  # type: ignore[no-untyped-def]
    conn = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=5)
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh database (its URL), dropped afterwards with every connection to it."""
    name = f"smallcaps_test_{uuid.uuid4().hex[:10]}"
    with contextlib.closing(_admin()) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG}/{name}"
    finally:
        with contextlib.closing(_admin()) as conn, conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_mb(db_url: str) -> float:
    """The size of a database at the server, MB."""
    with contextlib.closing(_admin()) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_database_size(%s)", (db_url.rsplit("/", 1)[1],))
        return cur.fetchone()[0] / 1e6


def host_envs(
    root: Path, events: Path, pg_url: str, **extra: str
) -> dict[str, dict[str, str]]:
    """Two hosts "a" and "b": each its own directory, DAGSTER_HOME (deploy/dagster.yaml) and copy of
    the events file; one Postgres instance, one data tree (root/data) and whatever `extra` sets
    (the simulator, the budget)."""
    envs = {}
    for h in ("a", "b"):
        own = root / f"host_{h}"
        own.mkdir()
        shutil.copy(events, own / "events.parquet")
        envs[h] = cli_env(own, SMALLCAPS_EVENTS=str(own / "events.parquet"),
                          SMALLCAPS_DATA_DIR=str(root / "data"), **team_home(own / "home", pg_url), **extra)
    return envs


def drop_redis_keys(prefix: str) -> None:
    """Delete a test's budget keys from the local Redis."""
    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    keys = list(r.scan_iter(match=prefix + "*"))
    if keys:
        r.delete(*keys)


def team_home(root: Path, pg_url: str, pool_limit: int | None = None) -> dict[str, str]:
    """A DAGSTER_HOME of its own holding deploy/dagster.yaml (with the polygon_api pool's limit
    changed if asked); returns the env entries for it."""
    root.mkdir(parents=True, exist_ok=True)
    text = (REPO / "deploy" / "dagster.yaml").read_text()
    if pool_limit is not None:
        assert "default_limit: 2" in text
        text = text.replace("default_limit: 2", f"default_limit: {pool_limit}")
    (root / "dagster.yaml").write_text(text)
    return {"DAGSTER_HOME": str(root), "DAGSTER_PG_URL": pg_url}


def init_instance(env: Mapping[str, str], pool_limit: int = 2) -> None:
    """The one-time set-up of a team's instance (README): create its tables and the polygon_api
    pool's row. Without it, runs starting together race to insert that row, and one fails with
    UniqueViolation on concurrency_limits_concurrency_key_key (seen on Postgres in test_postgres)."""
    subprocess.run([str(BIN / "dagster"), "instance", "concurrency", "set", "polygon_api", str(pool_limit)],
                   cwd=REPO, env=dict(env), capture_output=True, text=True, timeout=120, check=True)


class ConnectionPeak:
    """Samples the number of server connections to one database every 0.1 s while it runs."""

    def __init__(self, db_url: str):
        self.db = db_url.rsplit("/", 1)[1]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with contextlib.closing(_admin()) as conn, conn.cursor() as cur:
            while not self._stop.wait(0.1):
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.db,))
                self.peak = max(self.peak, cur.fetchone()[0])

    def __enter__(self) -> ConnectionPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def daemon(
    env: Mapping[str, str], log: Path, workspace: Path = REPO / "workspace.yaml"
) -> Iterator[subprocess.Popen]:  # type: ignore[type-arg]
    """``dagster-daemon run`` on a workspace, the repo's by default (the run queue, monitoring, retries)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)],
            cwd=REPO, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield proc
    finally:
        kill_group(proc)


def launch_range_proc(env: Mapping[str, str], first: str, last: str) -> subprocess.Popen:  # type: ignore[type-arg]
    """Submit one run of event_windows over FIRST...LAST to the instance's run queue (a process:
    `dagster job launch` loads the code first, which takes seconds)."""
    tags = json.dumps(
        {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
    )
    return subprocess.Popen(
        [str(BIN / "dagster"), "job", "launch", "-w", str(REPO / "workspace.yaml"),
         "-j", "ingest_event_windows", "--tags", tags],
        cwd=REPO, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def wait_daemon_ready(log: Path, timeout: float) -> None:
    """Until the daemon has started its daemons (its first log line about them)."""
    deadline = time.monotonic() + timeout
    while "Instance is configured with the following daemons" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)


def wait_runs_launched(env: Mapping[str, str], count: int, timeout: float) -> None:
    """Until `count` runs of ingest_event_windows have left the queue (STARTING or later)."""
    deadline = time.monotonic() + timeout
    while True:
        with team_instance(env) as instance:
            runs = [r for r in instance.get_runs() if r.job_name == "ingest_event_windows"]  # type: ignore[attr-defined]
        if len(runs) >= count and all(r.status.value not in ("QUEUED", "NOT_STARTED") for r in runs):
            return
        assert time.monotonic() < deadline, [(r.run_id[:8], r.status.value) for r in runs]
        time.sleep(0.5)


def wait_runs_finished(env: Mapping[str, str], count: int, timeout: float) -> list[dg.DagsterRun]:
    """Every run of the instance, once `count` runs exist and all are finished."""
    deadline = time.monotonic() + timeout
    while True:
        with team_instance(env) as instance:
            runs = list(instance.get_runs())  # type: ignore[attr-defined]
        if len(runs) >= count and all(r.is_finished for r in runs):
            return runs
        assert time.monotonic() < deadline, [(r.run_id[:8], r.status.value, r.tags) for r in runs]
        time.sleep(1.0)


def materializations_per_partition(env: Mapping[str, str], symbols: list[str]) -> dict[str, int]:
    """How many times each symbol was recorded as materialized: one per run that fetched it, each
    run's final record counted (a run of several symbols also writes a ``checkpoint`` record of a
    symbol as soon as it is complete, then the final one; a run with a checkpoint of a symbol must
    also have its final record)."""
    out: dict[str, int] = {}
    with team_instance(env) as instance:
        for s in symbols:
            records = instance.fetch_materializations(  # type: ignore[attr-defined]
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("event_windows"), asset_partitions=[s]), limit=10
            ).records

            def is_checkpoint(r: Any) -> bool:
                value = r.asset_materialization.metadata.get("checkpoint")
                return bool(getattr(value, "value", value))

            final = [r.run_id for r in records if not is_checkpoint(r)]
            checkpointed = {r.run_id for r in records if is_checkpoint(r)}
            assert checkpointed <= set(final), (s, checkpointed, final)
            out[s] = len(final)
    return out


def wait_for(what: str, predicate, timeout: float, logs: tuple[Path, ...] = ()):  # type: ignore[no-untyped-def]
    """predicate()'s first truthy value, polled every 0.5 s; the bound fails with the logs' tails."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tails}")
        time.sleep(0.5)


def pool_state(env: Mapping[str, str], pool: str = "polygon_api") -> tuple[list[str], list[str]]:
    """(run ids holding a slot of the pool, run ids with a step waiting for one), in the shared instance."""
    with team_instance(env) as instance:
        info = instance.event_log_storage.get_concurrency_info(pool)  # type: ignore[attr-defined]
        return [s.run_id for s in info.claimed_slots], [s.run_id for s in info.pending_steps]


def run_statuses(env: Mapping[str, str]) -> dict[str, str]:
    with team_instance(env) as instance:
        return {r.run_id: r.status.value for r in instance.get_runs()}  # type: ignore[attr-defined]


def event_times(env: Mapping[str, str], run_id: str, step_key: str | None = None) -> dict[str, list[float]]:
    """event type -> timestamps of a run's events (only the step's when step_key is given)."""
    out: dict[str, list[float]] = {}
    with team_instance(env) as instance:
        for e in instance.all_logs(run_id):  # type: ignore[attr-defined]
            if e.dagster_event and (step_key is None or e.step_key == step_key):
                out.setdefault(e.dagster_event.event_type_value, []).append(e.timestamp)
    return out


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of the [start, end] spans that hold one moment."""
    points = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    most = now = 0
    for _, step in points:
        now += step
        most = max(most, now)
    return most
