"""SIGTERM stops a run promptly, whatever the pages per range, and a resume is exact.

The real CLI (``dagster asset materialize --partition-range``, its own process group, a temporary
DAGSTER_HOME) against a simulator started here, with latency and a page cap that makes each
range many pages long, at the issue's 10 req/s and 12 workers. Figures are printed (``-s``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from smallcaps_ingest.core import store
from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import REPO, TEST_KEY, cli_env
from smallcaps_ingest_tests.resilience_helpers import (
    assert_dataset_exact,
    cli_instance,
    complete_events,
    group_pids,
    kill_group,
    manifest_windows,
    materialize,
    materialize_argv,
    release_memory,
    requests_outside_todo,
    run_statuses,
    tmp_files,
    wait_first_request,
    write_events_subset,
)

# AAOI and DGLY: 6,000-13,000 quotes per window, so 7-14 pages of 1,000 rows per range; KOSS and
# XELB are small and finish early, so some symbols are complete when the signal comes.
SYMBOLS = ("AAOI", "DGLY", "KOSS", "XELB")
RANGE = ("--partition-range", "AAOI...XELB")
PAGE_CAP = 1_000
STOP_BOUND_S = 10.0  # the bound: gone within 10 s of SIGTERM at 10 req/s and 12 workers
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})


def _materialized(env: dict[str, str]) -> dict[str, str]:
    """symbol -> run id of its latest event_windows materialization."""
    out: dict[str, str] = {}
    with cli_instance(env) as instance:
        for sym in SYMBOLS:
            recs = instance.fetch_materializations(  # type: ignore[attr-defined]
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("event_windows"), asset_partitions=[sym]), limit=1
            ).records
            if recs:
                out[sym] = recs[0].run_id
    return out


def _wait_group_gone(pgid: int, bound: float) -> float | None:
    """Seconds until no process of the group is left (None if some still run after ``bound``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        if not group_pids(pgid):
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("executor", ["multiprocess", "in_process"])
def test_sigterm_stops_promptly_and_resume_is_exact(tmp_path: Path, executor: str) -> None:
    release_memory()
    events = tmp_path / "events.parquet"
    write_events_subset(events, SYMBOLS)
    with Simulator(SimConfig(latency_ms=100, latency_jitter_ms=20, page_cap=PAGE_CAP, seed=7)) as sim:
        env = cli_env(
            tmp_path,
            POLYGON_BASE_URL=sim.base_url,
            POLYGON_API_KEY=TEST_KEY,
            POLYGON_BUDGET_PATH=str(tmp_path / "budget.sqlite"),
            POLYGON_MAX_RPS="10",
            POLYGON_WORKERS="12",
            SMALLCAPS_EVENTS=str(events),
        )
        data = Path(env["SMALLCAPS_DATA_DIR"])
        materialize(env, "--select", "manifest", "--config-json", IN_PROCESS)
        manifest = pl.read_parquet(data / "manifest.parquet")
        windows = manifest_windows(manifest)
        extra = () if executor == "multiprocess" else ("--config-json", IN_PROCESS)

        log = tmp_path / "stopped_run.log"
        t0 = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                materialize_argv("--select", "event_windows", *RANGE, *extra),
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            assert wait_first_request(sim, t0, proc, timeout=90) is not None, log.read_text()[-3000:]
            # wait until at least one symbol is recorded and some events of the big ones are on disk
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, "the run ended before the signal:\n" + log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no symbol was recorded within 120 s"
                recorded = _materialized(env)
                on_disk = complete_events(data)
                if recorded and sum(len(on_disk.get(s, ())) for s in SYMBOLS if s not in recorded) >= 3:
                    break
                time.sleep(0.3)
            t_term = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            gone_after = _wait_group_gone(proc.pid, STOP_BOUND_S)
            t_gone = time.monotonic()
        finally:
            if proc.poll() is None or group_pids(proc.pid):
                with contextlib.suppress(Exception):
                    kill_group(proc)
        proc.wait(timeout=30)
        late = [r for r in sim.request_log() if r.t > t_term]
        print(
            f"graceful stop ({executor}): gone {gone_after and round(gone_after, 2)} s "
            f"after SIGTERM; {len(late)} requests reached the server after the signal, the last "
            f"{round(max((r.t for r in late), default=t_term) - t_term, 2)} s after it; rc={proc.returncode}"
        )
        assert gone_after is not None, (
            f"processes still running {STOP_BOUND_S} s after SIGTERM:\n{log.read_text()[-3000:]}"
        )
        # no new request after the signal: only those already granted when it came (one per worker)
        assert len(late) <= 12 and all(r.t - t_term < 2.0 for r in late), late

        # nothing partial is visible: every event directory holds both files or none, no tmp file
        for sym in SYMBOLS:
            scan = store.scan_symbol(data, sym)
            assert not scan.partial, (sym, sorted(scan.partial))
        assert tmp_files(data) == []

        # the run is marked failed or canceled; symbols recorded before the signal stay recorded
        statuses = run_statuses(env)
        stopped = [st for st in statuses.values() if st != "SUCCESS"]  # the other run is the manifest's
        assert len(statuses) == 2 and stopped in (["FAILURE"], ["CANCELED"]), statuses
        after = _materialized(env)
        assert all(after.get(s) == run_id for s, run_id in recorded.items()), (recorded, after)
        before_resume = complete_events(data)
        for sym in after:
            assert before_resume[sym] == {w.event_id for w in windows[sym]}, sym  # recorded = complete
        assert sum(map(len, before_resume.values())) < manifest.height  # the stop cut the run short

        # resume: exact, and no request for an event that was complete before it
        t_resume = time.monotonic()
        materialize(env, "--select", "event_windows", *RANGE, *extra)
        resumed = [r for r in sim.request_log() if r.t >= t_resume]
        misplaced, useless = requests_outside_todo(resumed, windows, before_resume)
        assert not misplaced and not useless, (misplaced[:3], useless[:3])
        assert assert_dataset_exact(data, manifest) == manifest.height
        print(
            f"graceful stop ({executor}): resume made {len(resumed)} requests for "
            f"{manifest.height - sum(map(len, before_resume.values()))} events; t_gone-t_term="
            f"{t_gone - t_term:.2f}"
        )
