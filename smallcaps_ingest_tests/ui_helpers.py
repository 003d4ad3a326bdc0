"""Helpers for the browser test: a ``dagster dev`` subprocess, its GraphQL API and headless Chromium.

Everything stays on loopback: the webserver binds 127.0.0.1 on a free port, Polygon is the bundled
simulator and Chromium runs with background networking, component updates and sync disabled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]

# Flags required on this machine (no GPU, no sandbox, no traffic beyond loopback).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

BACKFILL_DONE = {"COMPLETED", "COMPLETED_SUCCESS"}
BACKFILL_BAD = {"FAILED", "COMPLETED_FAILED", "CANCELED", "CANCELING", "FAILING"}
RUN_BAD = {"FAILURE", "CANCELED", "CANCELING"}


def find_chromium() -> str | None:
    """/usr/bin/chromium, else ``chromium`` on PATH, else None."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Webserver:
    """A Dagster webserver at ``url`` whose process is ``proc`` (logging to ``log_path``): its
    readiness and its GraphQL API. Subclasses start the processes."""

    url: str
    proc: subprocess.Popen  # type: ignore[type-arg]
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def _alive_or_fail(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.proc.args} exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}"
            )

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Until /server_info answers (the code location may not be loaded yet)."""
        deadline = time.monotonic() + timeout
        while True:
            self._alive_or_fail()
            try:
                requests.get(f"{self.url}/server_info", timeout=2).raise_for_status()
                return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.url}/server_info did not answer in {timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until /server_info answers and the code location is loaded (needed by the mutations)."""
        deadline = time.monotonic() + timeout
        self.wait_serving(timeout)
        query = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
            name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
        while True:
            self._alive_or_fail()
            entries = self.gql(query)["workspaceOrError"].get("locationEntries") or []
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                errors = [
                    e for e in entries if e["locationOrLoadError"]["__typename"] != "RepositoryLocation"
                ]
                # a code server of its own that is not serving yet (deploy/workspace.yaml's): the
                # webserver reconnects by itself once it is; any other error is final
                if not errors:
                    return
                if not all("DagsterUserCodeUnreachableError" in str(e["locationOrLoadError"])
                           for e in errors):
                    raise AssertionError(f"code location failed to load: {errors}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"code location not loaded in {timeout:.0f}s: {entries}\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def gql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        payload = {"query": query, "variables": dict(variables or {})}
        r = requests.post(f"{self.url}/graphql", json=payload, timeout=30)
        r.raise_for_status()
        body = r.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]


class DagsterDev(Webserver):
    """``dagster dev`` (webserver + daemon + code server) in its own process group.

    ``target``: the code location arguments (``benchmarks/backfill_bench.py`` passes ``-f FILE``)."""

    def __init__(
        self,
        bin_dir: Path,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path = REPO,
        target: Sequence[str] = ("-m", "smallcaps_ingest"),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(bin_dir / "dagster"), "dev", *target, "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals every child too
        )

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the whole group, then SIGKILL whatever is left (the code server may linger)."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(grace)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group (the code server)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        finally:
            self._log.close()


LAUNCH_BACKFILL = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
    ... on PythonError { stack }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

BACKFILL_STATUS = """
query BackfillStatus($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      id status numPartitions
      error { message stack }
      runs { id status tags { key value } }
    }
    ... on BackfillNotFoundError { message }
    ... on PythonError { message stack }
  }
}
"""

RUN_ERRORS = """
query RunErrors($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection { events { __typename ... on MessageEvent { level message stepKey } } }
  }
}
"""


def launch_backfill(
    dev: Webserver, asset: str, partitions: Sequence[str], title: str = "test_ui_browser"
) -> str:
    params = {
        "partitionNames": list(partitions),
        "assetSelection": [{"path": [asset]}],
        "fromFailure": False,
        "title": title,
    }
    out = dev.gql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    if out["__typename"] != "LaunchBackfillSuccess":
        raise AssertionError(f"launchPartitionBackfill failed: {out}")
    return str(out["backfillId"])


def _run_errors(dev: Webserver, run_id: str) -> list[str]:
    logs = dev.gql(RUN_ERRORS, {"runId": run_id})["logsForRun"]
    return [
        f"[{e.get('stepKey') or '-'}] {e['message'][:500]}"
        for e in logs.get("events", [])
        if e.get("level") in ("ERROR", "CRITICAL")
    ]


ASSET_PARTITIONS = """
query AssetPartitions($path: [String!]!) {
  assetNodes(assetKeys: [{path: $path}]) {
    assetPartitionStatuses {
      __typename
      ... on DefaultPartitionStatuses { materializedPartitions failedPartitions materializingPartitions }
    }
  }
}
"""


def materialized_partitions(dev: Webserver, asset: str) -> set[str]:
    nodes = dev.gql(ASSET_PARTITIONS, {"path": [asset]})["assetNodes"]
    return set(nodes[0]["assetPartitionStatuses"].get("materializedPartitions") or [])


def wait_backfill(
    dev: Webserver, backfill_id: str, asset: str, partitions: Sequence[str], timeout: float = 120.0
) -> tuple[dict[str, Any], dict[str, float]]:
    """Poll until the backfill is done; fail with its error, its failed runs' errors and the log.

    Done means COMPLETED_SUCCESS, or every run it launched succeeded and every requested partition
    is materialized: the daemon marks the backfill complete only on its next tick (up to 30 s later).
    Returns the backfill and the seconds until its first run existed and until it was done.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    marks: dict[str, float] = {}
    last: dict[str, Any] = {}
    while True:
        if dev.proc.poll() is not None:
            raise AssertionError(f"{dev.proc.args} died during the backfill:\n{dev.log_tail()}")
        last = dev.gql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        if last["__typename"] != "PartitionBackfill":
            raise AssertionError(f"backfill {backfill_id}: {last}")
        runs = last.get("runs") or []
        if runs and "runs_created_s" not in marks:
            marks["runs_created_s"] = time.monotonic() - t0
        bad_runs = [r for r in runs if r["status"] in RUN_BAD]
        if last["status"] in BACKFILL_BAD or bad_runs:
            details = {r["id"]: (r["status"], _run_errors(dev, r["id"])) for r in bad_runs}
            raise AssertionError(
                f"backfill {backfill_id} status {last['status']}, error {last.get('error')}, "
                f"failed runs {details}\n{dev.log_tail()}"
            )
        done = last["status"] in BACKFILL_DONE or (
            runs
            and all(r["status"] == "SUCCESS" for r in runs)
            and set(partitions) <= materialized_partitions(dev, asset)
        )
        if done:
            marks["done_s"] = time.monotonic() - t0
            return last, marks
        if time.monotonic() > deadline:
            raise AssertionError(
                f"backfill {backfill_id} not done in {timeout:.0f}s: status {last['status']}, "
                f"runs {[(r['id'], r['status']) for r in runs]}\n{dev.log_tail()}"
            )
        time.sleep(1.0)


CHECK_PARTITION_STATUSES = """
query CheckStatuses($path: [String!]!) {
  assetNodes(assetKeys: [{path: $path}]) {
    assetChecksOrError {
      __typename
      ... on AssetChecks {
        checks {
          name
          partitionStatuses {
            __typename
            ... on AssetCheckDefaultPartitionStatuses {
              succeededPartitions failedPartitions inProgressPartitions
              skippedPartitions executionFailedPartitions
            }
          }
        }
      }
    }
  }
}
"""


def check_partition_statuses(dev: Webserver, asset: str) -> dict[str, dict[str, list[str]]]:
    """{check name: {status field: [partition, ...]}} as the UI's Partitions view reads it."""
    nodes = dev.gql(CHECK_PARTITION_STATUSES, {"path": [asset]})["assetNodes"]
    checks = nodes[0]["assetChecksOrError"]["checks"]
    return {
        c["name"]: {k: v for k, v in (c["partitionStatuses"] or {}).items() if k != "__typename"}
        for c in checks
    }


CHECK_EXECUTIONS = """
query ($path: [String!]!, $check: String!, $partition: String) {
  assetCheckExecutions(assetKey: {path: $path}, checkName: $check, partition: $partition, limit: 1) {
    status
    partition
    evaluation { success }
  }
}
"""


def latest_check_execution(dev: Webserver, asset: str, check: str, partition: str) -> dict[str, Any] | None:
    """The newest execution of one check on one partition, as the check's Execution history shows it."""
    got = dev.gql(CHECK_EXECUTIONS, {"path": [asset], "check": check, "partition": partition})
    rows = got["assetCheckExecutions"]
    return rows[0] if rows else None


def dismiss_nux(page: Any, dev: Webserver, timeout_ms: float = 30_000) -> bool:
    """Skip the "Join the Dagster community" modal of a fresh DAGSTER_HOME, if the server will show it.

    The modal pops up asynchronously after the first page load; the webserver says beforehand
    (``shouldShowNux``) whether it will, so this waits for it only when it is due. "Skip" records
    the choice in DAGSTER_HOME, so later pages do not show it again. Returns whether it was shown.
    """
    if not dev.gql("{ shouldShowNux }")["shouldShowNux"]:
        return False
    page.get_by_role("button", name="Skip", exact=True).click(timeout=timeout_ms)
    page.get_by_text("Join the Dagster community", exact=True).wait_for(state="hidden", timeout=timeout_ms)
    return True


def ensure_no_modal(page: Any, timeout_ms: float = 10_000) -> None:
    """Backstop before a screenshot: click "Skip" if the community modal is up, wait until it is gone."""
    modal = page.get_by_text("Join the Dagster community", exact=True)
    if modal.count() and modal.first.is_visible():
        page.get_by_role("button", name="Skip", exact=True).click(timeout=timeout_ms)
        modal.first.wait_for(state="hidden", timeout=timeout_ms)
