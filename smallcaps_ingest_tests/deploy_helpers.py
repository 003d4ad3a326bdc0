"""Helpers for the deployment recipes' tests: deploy/Procfile and deploy/systemd/ read as an
operator's tools read them, and the Procfile's processes started on loopback."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smallcaps_ingest_tests.conftest import REPO
from smallcaps_ingest_tests.resilience_helpers import group_pids, kill_group
from smallcaps_ingest_tests.ui_helpers import Webserver, tail

DEPLOY = REPO / "deploy"
PROCFILE = DEPLOY / "Procfile"
ENV_FILE = DEPLOY / "smallcaps.env"
SYSTEMD = DEPLOY / "systemd"
VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


def procfile(path: Path = PROCFILE) -> dict[str, str]:
    """{process type: command} as foreman/honcho read it: `name: command` lines, `#` comments."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, command = line.partition(":")
        assert sep and re.fullmatch(r"[A-Za-z0-9_-]+", name), f"not a Procfile line: {line!r}"
        assert name not in out, f"process type {name} twice"
        out[name] = command.strip()
    return out


def env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """KEY=value lines (the format of systemd's EnvironmentFile and honcho's -e), comments skipped."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=value: {line!r}"
            out[key.strip()] = value.strip()
    return out


def unit_service(path: Path) -> dict[str, list[str]]:
    """The [Service] section of a systemd unit: {key: [values, in order]} (keys may repeat)."""
    section, out = "", {}  # type: tuple[str, dict[str, list[str]]]
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


class ProcfileHost(Webserver):
    """The processes of deploy/Procfile, each started by `start` as `sh -c COMMAND` in its own
    process group from the repository's root (as honcho does), with `env`; the webserver is the
    GraphQL endpoint."""

    def __init__(self, env: Mapping[str, str], logs: Path) -> None:
        self.commands = procfile()
        missing = {v for c in self.commands.values() for v in VARIABLE.findall(c)} - set(env)
        assert not missing, f"the Procfile uses variables the test does not set: {missing}"
        self.env = dict(env)
        self.procs: dict[str, subprocess.Popen] = {}  # type: ignore[type-arg]
        self.logs = {name: logs / f"{name}.log" for name in self.commands}
        self.url = f"http://{env['SMALLCAPS_WEBSERVER_HOST']}:{env['SMALLCAPS_WEBSERVER_PORT']}"
        self.log_path = self.logs["webserver"]

    def start(self, name: str) -> None:
        with open(self.logs[name], "wb") as out:
            self.procs[name] = subprocess.Popen(
                ["/bin/sh", "-c", self.commands[name]], cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        if name == "webserver":
            self.proc = self.procs[name]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- {name}:\n{tail(path, lines)}" for name, path in self.logs.items()
                         if name in self.procs)

    def _alive_or_fail(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"processes exited: {dead}\n{self.log_tail()}"

    def stop(self, timeout: float) -> dict[str, int | None]:
        """SIGTERM each process group (webserver, daemon, then the code server); wait up to `timeout`
        for all of each group to exit. Returns {name: exit code}, None for a process that needed
        SIGKILL (every group is gone afterwards either way)."""
        codes: dict[str, int | None] = {}
        for name in sorted(self.procs, key=lambda n: n == "codeserver"):
            proc = self.procs[name]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while (proc.poll() is None or group_pids(proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if proc.poll() is None or group_pids(proc.pid):
                kill_group(proc)
                codes[name] = None
            else:
                codes[name] = proc.returncode
        return codes

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None or group_pids(proc.pid):
                kill_group(proc)


def chart_instance(values: Mapping[str, Any], pg: Mapping[str, Any]) -> dict[str, Any]:
    """The instance dagster.yaml the Dagster chart writes from `values` (its
    templates/configmap-instance.yaml with the helpers instance/_postgresql.tpl,
    _run-coordinator.tpl and _concurrency.tpl, for the sections these values set), with the
    database's coordinates `pg` (hostname, username, db_name, port) in place of the cluster's."""
    pg_values = values["postgresql"]
    postgres_db = {"username": pg["username"], "password": {"env": "DAGSTER_PG_PASSWORD"},
                   "hostname": pg["hostname"], "db_name": pg["db_name"], "port": pg["port"],
                   "params": pg_values.get("postgresqlParams") or {}}
    if pg_values.get("postgresqlScheme"):
        postgres_db["scheme"] = pg_values["postgresqlScheme"]
    storage = {f"{kind}_storage": {"module": f"dagster_postgres.{module}", "class": cls,
                                   "config": {"postgres_db": postgres_db}}
               for kind, module, cls in (("run", "run_storage", "PostgresRunStorage"),
                                         ("event_log", "event_log", "PostgresEventLogStorage"),
                                         ("schedule", "schedule_storage", "PostgresScheduleStorage"))}
    daemon, concurrency = values["dagsterDaemon"], values.get("concurrency", {})
    out: dict[str, Any] = dict(storage)
    coordinator = daemon["runCoordinator"]
    if coordinator["enabled"]:
        assert coordinator["type"] == "QueuedRunCoordinator"
        queued = (coordinator.get("config") or {}).get("queuedRunCoordinator") or {}
        config = {}
        # written when concurrency is disabled, or when set (-1 if unset and concurrency disabled)
        if not concurrency.get("enabled") or queued.get("maxConcurrentRuns") is not None:
            config["max_concurrent_runs"] = queued.get("maxConcurrentRuns", -1)
        out["run_coordinator"] = {"module": "dagster.core.run_coordinator",
                                  "class": "QueuedRunCoordinator", **({"config": config} if config else {})}
    if concurrency.get("enabled"):
        pools, runs = concurrency.get("pools") or {}, concurrency.get("runs") or {}
        keys = {"defaultLimit": "default_limit", "granularity": "granularity",
                "opGranularityRunBuffer": "op_granularity_run_buffer"}
        out["concurrency"] = {}
        if rendered := {keys[k]: v for k, v in pools.items() if v is not None}:
            out["concurrency"]["pools"] = rendered
        if runs.get("maxConcurrentRuns") is not None:
            out["concurrency"]["runs"] = {"max_concurrent_runs": runs["maxConcurrentRuns"]}
    monitoring = daemon["runMonitoring"]
    if monitoring.get("enabled"):
        out["run_monitoring"] = {"enabled": True,
                                 "start_timeout_seconds": monitoring["startTimeoutSeconds"],
                                 "poll_interval_seconds": monitoring["pollIntervalSeconds"],
                                 "free_slots_after_run_end_seconds":
                                     monitoring["freeSlotsAfterRunEndSeconds"]}
        for key, name in (("cancelTimeoutSeconds", "cancel_timeout_seconds"),
                          ("maxResumeRunAttempts", "max_resume_run_attempts")):
            if monitoring.get(key) is not None:
                out["run_monitoring"][name] = monitoring[key]
    retries = daemon["runRetries"]
    if retries.get("enabled"):
        out["run_retries"] = {"enabled": True, **({"max_retries": retries["maxRetries"]}
                                                   if retries.get("maxRetries") else {})}
    out["telemetry"] = {"enabled": values["telemetry"]["enabled"]}
    return out
