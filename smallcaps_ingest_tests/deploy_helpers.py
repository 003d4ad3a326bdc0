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
    """Every process of deploy/Procfile, each as `sh -c COMMAND` in its own process group from the
    repository's root (as honcho does), with `env`; the webserver is the GraphQL endpoint."""

    def __init__(self, env: Mapping[str, str], logs: Path) -> None:
        self.commands = procfile()
        missing = {v for c in self.commands.values() for v in VARIABLE.findall(c)} - set(env)
        assert not missing, f"the Procfile uses variables the test does not set: {missing}"
        self.procs: dict[str, subprocess.Popen] = {}  # type: ignore[type-arg]
        self.logs = {name: logs / f"{name}.log" for name in self.commands}
        for name, command in self.commands.items():
            with open(self.logs[name], "wb") as out:
                self.procs[name] = subprocess.Popen(
                    ["/bin/sh", "-c", command], cwd=REPO, env=dict(env), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
        self.url = f"http://{env['SMALLCAPS_WEBSERVER_HOST']}:{env['SMALLCAPS_WEBSERVER_PORT']}"
        self.proc = self.procs["webserver"]
        self.log_path = self.logs["webserver"]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- {name}:\n{tail(path, lines)}" for name, path in self.logs.items())

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
