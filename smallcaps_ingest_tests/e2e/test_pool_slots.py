"""A run killed while it holds the ``polygon_api`` pool slot does not keep it (dagster#33643).

A real instance (the repository's dagster.yaml, with a 1 s monitoring poll, a pool of one slot and
no run retries so that the slot's fate is visible) and ``dagster-daemon run`` on it, against a
simulator started here. A run launched through the queue is SIGKILLed while it holds the slot; its
code server marks it failed, and the daemon's run monitoring frees the slot
``run_monitoring.free_slots_after_run_end_seconds`` after the run's end, so the next run gets it
without a manual ``smallcaps-ingest cleanup``. Without the setting the slot stays claimed and the
second run waits for ever (this test then fails on its bound).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import dagster as dg
import yaml

from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import BIN, REPO, TEST_KEY, cli_env
from smallcaps_ingest_tests.resilience_helpers import (
    cli_instance,
    group_pids,
    kill_group,
    materialize,
    pool_claims,
    release_memory,
    write_events_subset,
)

IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})


def _instance_yaml(home: Path) -> int:
    """The repository's dagster.yaml with a quick monitoring poll, one pool slot, no run retries.

    Returns the free-slots setting it carries (0 when absent)."""
    config = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    config["run_monitoring"]["poll_interval_seconds"] = 1
    config["concurrency"]["pools"]["default_limit"] = 1
    config["run_retries"] = {"enabled": False}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return int(config["run_monitoring"].get("free_slots_after_run_end_seconds") or 0)


def _launch(env: dict[str, str], symbol: str) -> str:
    run_id = str(uuid.uuid4())
    done = subprocess.run(
        [str(BIN / "dagster"), "job", "launch", "-w", "workspace.yaml", "-j", "ingest_event_windows",
         "--tags", json.dumps({"dagster/partition": symbol}), "--config-json", IN_PROCESS,
         "--run-id", run_id],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return run_id


def _wait(what: str, predicate, timeout: float, log: Path):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n--- daemon log ---\n{log.read_text()[-3000:]}")


def _status(env: dict[str, str], run_id: str) -> str | None:
    with cli_instance(env) as instance:
        run = instance.get_run_by_id(run_id)  # type: ignore[attr-defined]
        return run.status.value if run else None


def _run_pid(env: dict[str, str], run_id: str) -> int | None:
    """The pid of the process executing the run (the in-process executor: its only process)."""
    with cli_instance(env) as instance:
        starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_START)  # type: ignore[attr-defined]
        return starts[0].dagster_event.pid if starts and starts[0].dagster_event else None


def test_killed_run_frees_its_pool_slot(tmp_path: Path) -> None:
    release_memory()
    events = tmp_path / "events.parquet"
    write_events_subset(events, ("AAOI", "XELB"))
    # slow enough that the first run is still fetching when it is killed
    with Simulator(SimConfig(latency_ms=100, page_cap=1_000)) as sim:
        env = cli_env(
            tmp_path,
            POLYGON_BASE_URL=sim.base_url,
            POLYGON_API_KEY=TEST_KEY,
            POLYGON_BUDGET_PATH=str(tmp_path / "budget.sqlite"),
            POLYGON_MAX_RPS="10",
            SMALLCAPS_EVENTS=str(events),
        )
        free_after = _instance_yaml(Path(env["DAGSTER_HOME"]))
        materialize(env, "--select", "manifest", "--config-json", IN_PROCESS)
        log = tmp_path / "daemon.log"
        with open(log, "wb") as out:
            daemon = subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            first = _launch(env, "AAOI")
            _wait("the first run holds the slot", lambda: first in pool_claims(env)[1], 180, log)
            pid = _wait("the first run's process", lambda: _run_pid(env, first), 60, log)
            fetching = lambda: any(r.ticker == "AAOI" for r in sim.request_log())  # noqa: E731
            _wait("the first run's requests", fetching, 60, log)
            os.kill(pid, signal.SIGKILL)
            t_kill = time.monotonic()

            second = _launch(env, "XELB")
            failed = _wait("the killed run marked failed", lambda: _status(env, first) == "FAILURE", 60, log)
            assert failed
            t_failed = time.monotonic()
            # freed free_after s after the run's end, on a monitoring tick (1 s here); the bound is
            # generous for a shared host, and never met without the setting
            bound = max(free_after, 30) + 60
            _wait("the slot freed", lambda: first not in pool_claims(env)[1], bound, log)
            t_freed = time.monotonic()
            _wait("the second run succeeded", lambda: _status(env, second) == "SUCCESS", 120, log)
            limit, holders = pool_claims(env)
            assert limit == 1 and holders == [], (limit, holders)
            print(
                f"pool slots: killed run failed {t_failed - t_kill:.1f} s after SIGKILL, its slot freed "
                f"{t_freed - t_failed:.1f} s later (setting {free_after} s); the next run succeeded "
                f"{time.monotonic() - t_kill:.1f} s after the kill"
            )
        finally:
            if daemon.poll() is None:
                os.killpg(daemon.pid, signal.SIGTERM)
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    kill_group(daemon)
            if group_pids(daemon.pid):
                kill_group(daemon)
