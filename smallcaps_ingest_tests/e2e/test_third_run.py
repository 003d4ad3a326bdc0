"""Two hosts running, then more runs: they wait for the ``polygon_api`` pool, they do not oversubscribe.

The two-host setting of test_two_hosts (separate DAGSTER_HOMEs with the shipped deploy/dagster.yaml:
a pool of 2 slots, a queue of 4 runs; one Postgres instance, one Redis budget, one data tree). Host a
runs the daemon. Two CLI range runs (one per host) take both slots; then, while they run, a third
run is submitted to the queue from host b and a fourth CLI run starts on host a. The queue holds the
third (its pool is full: Dagster's ``block_op_concurrency_limited_runs``, on by default), the fourth
starts and its step waits for a slot (pools bound steps of every run, CLI runs too). The simulator
answers slowly (10 s) until both are seen waiting, so the first two cannot finish first on a loaded
host; then at full speed.

Asserted from the instance's records: at no moment more than two ``event_windows`` steps ran (step
start to end), the third left the queue only after a slot was freed, and the two waiting runs'
first requests reached the server after one of the first two ranges' last; every run succeeded,
0 x 429, the tree exact, every partition recorded once.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import polars as pl

from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import REPO, TEST_KEY
from smallcaps_ingest_tests.resilience_helpers import (
    assert_dataset_exact,
    kill_group,
    materialize,
    materialize_argv,
    write_events_subset,
)
from smallcaps_ingest_tests.team_helpers import (
    LOG_PROBLEMS,
    daemon,
    drop_redis_keys,
    event_times,
    host_envs,
    init_instance,
    launch_range_proc,
    materializations_per_partition,
    most_at_once,
    pg_database,
    pool_state,
    run_statuses,
    team_instance,
    wait_daemon_ready,
    wait_for,
    wait_runs_finished,
)

SYMBOLS = ["AAOI", "BBIG", "BRK.B", "CLOV", "DGLY", "FCEL", "GNUS", "IDEX"]
RANGES = {  # run -> (host, first, last): contiguous, disjoint ranges of the 8 partitions
    "cli_a": ("a", "AAOI", "BBIG"),
    "cli_b": ("b", "BRK.B", "CLOV"),
    "queued": ("b", "DGLY", "FCEL"),  # submitted to the queue from host b, launched by host a's daemon
    "cli_late": ("a", "GNUS", "IDEX"),
}
RPS = 20
STEP = "event_windows"
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})


def _range_of(run) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    tags = run.tags
    return tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")


def _cli(env: dict[str, str], first: str, last: str, log: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    with open(log, "wb") as out:
        return subprocess.Popen(
            materialize_argv("--select", STEP, "--partition-range", f"{first}...{last}"),
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _run_ids(env: dict[str, str]) -> dict[str, str]:
    """run name (RANGES) -> run id, for the runs that exist yet."""
    with team_instance(env) as instance:
        by_range = {_range_of(r): r.run_id for r in instance.get_runs()}  # type: ignore[attr-defined]
    return {name: by_range[(f, la)] for name, (_, f, la) in RANGES.items() if (f, la) in by_range}


def test_third_run_waits_for_a_slot(tmp_path: Path) -> None:
    events = tmp_path / "events.parquet"
    write_events_subset(events, SYMBOLS)
    prefix = f"smallcaps-test-{uuid.uuid4().hex[:12]}:"
    budget_url = f"redis://127.0.0.1:6379/0?key_prefix={prefix}"
    # page_cap 1000: ~350 requests a range; 10 s per answer until the waiting runs are seen
    with pg_database() as url, Simulator(SimConfig(rate_limit_rps=RPS, page_cap=1000)) as sim:
        envs = host_envs(tmp_path, events, url, POLYGON_BASE_URL=sim.base_url, POLYGON_API_KEY=TEST_KEY,
                         POLYGON_MAX_RPS=str(RPS), POLYGON_BUDGET_URL=budget_url)
        env_a = envs["a"]
        init_instance(env_a)  # the shipped pool of 2 slots
        materialize(env_a, "--select", "manifest", "--config-json", IN_PROCESS)
        sim.config.latency_ms = 10_000  # read on every request
        sim.reset_counters()
        logs = {name: tmp_path / f"{name}.log" for name in RANGES}
        dlog = tmp_path / "daemon.log"
        all_logs = (*logs.values(), dlog)
        procs: list[subprocess.Popen] = []  # type: ignore[type-arg]
        try:
            with daemon(env_a, dlog) as d:
                wait_daemon_ready(dlog, timeout=180)
                for name in ("cli_a", "cli_b"):
                    h, first, last = RANGES[name]
                    procs.append(_cli(envs[h], first, last, logs[name]))
                ids = wait_for("the first two runs", lambda: len(_run_ids(env_a)) == 2 and _run_ids(env_a),
                               300, all_logs)
                first_two = {ids["cli_a"], ids["cli_b"]}
                wait_for("both slots held by the first two runs",
                         lambda: set(pool_state(env_a)[0]) == first_two, 300, all_logs)
                # while they run: a third run through the queue (from host b), a fourth from the CLI
                _, f, la = RANGES["queued"]
                procs.append(launch_range_proc(envs["b"], f, la))
                _, f, la = RANGES["cli_late"]
                procs.append(_cli(env_a, f, la, logs["cli_late"]))
                ids = wait_for("four runs", lambda: len(_run_ids(env_a)) == 4 and _run_ids(env_a),
                               300, all_logs)
                wait_for("the third run in the queue",
                         lambda: run_statuses(env_a)[ids["queued"]] != "NOT_STARTED", 300, all_logs)
                wait_for("the fourth run's step waiting for a slot",
                         lambda: ids["cli_late"] in pool_state(env_a)[1], 300, all_logs)
                held, _ = pool_state(env_a)
                statuses = run_statuses(env_a)
                late = ("DGLY", "FCEL", "GNUS", "IDEX")
                waiting = {
                    "slots": set(held), "queued": statuses[ids["queued"]], "late": statuses[ids["cli_late"]],
                    "late requests": [r for r in sim.request_log() if r.ticker in late],
                }
                sim.config.latency_ms = 30  # let them finish
                for p in procs:
                    p.wait(timeout=600)
                runs = wait_runs_finished(env_a, 1 + len(RANGES), timeout=600)
                assert d.poll() is None, "the daemon died"
        finally:
            for p in procs:
                if p.poll() is None:
                    kill_group(p)
            drop_redis_keys(prefix)

        # while the first two ran: they held both slots, the queued run stayed queued, the CLI run
        # had started but its step waited, and neither had sent a request
        assert waiting["slots"] == first_two, waiting
        assert waiting["queued"] == "QUEUED" and waiting["late"] == "STARTED", waiting
        assert waiting["late requests"] == [], waiting["late requests"][:3]

        assert sorted(r.status.value for r in runs) == ["SUCCESS"] * 5, [(r.status.value, r.tags)
                                                                        for r in runs]
        marks = {name: event_times(env_a, ids[name], STEP) for name in RANGES}
        spans = {}
        for name, m in marks.items():
            assert len(m.get("STEP_START", [])) == 1 and len(m.get("STEP_SUCCESS", [])) == 1, (name, m.keys())
            spans[name] = (m["STEP_START"][0], m["STEP_SUCCESS"][0])
        print("event_windows steps (start, end) s:",
              {n: tuple(round(t - spans["cli_a"][0], 1) for t in s) for n, s in spans.items()})
        assert most_at_once(list(spans.values())) <= 2, spans  # never more steps than slots
        first_free = min(spans["cli_a"][1], spans["cli_b"][1])
        dequeued = event_times(env_a, ids["queued"])  # the queue let it go after a slot was freed
        assert "PIPELINE_ENQUEUED" in dequeued and dequeued["PIPELINE_STARTING"][0] > first_free, dequeued
        assert spans["queued"][0] > first_free and spans["cli_late"][0] > first_free, spans
        # at the server: the waiting runs' first requests after one of the first ranges' last
        log = sim.request_log()
        by_range = {n: [x.t for x in log if f <= (x.ticker or "") <= la] for n, (_, f, la) in RANGES.items()}
        assert all(by_range.values()), {n: len(ts) for n, ts in by_range.items()}
        first_done = min(by_range["cli_a"][-1], by_range["cli_b"][-1])
        assert min(by_range["queued"][0], by_range["cli_late"][0]) > first_done
        assert sum(x.status == 429 for x in log) == 0 and sim.max_in_window(1.0) <= RPS
        data = tmp_path / "data"
        assert_dataset_exact(data, pl.read_parquet(data / "manifest.parquet"))
        assert materializations_per_partition(env_a, SYMBOLS) == {s: 1 for s in SYMBOLS}
        for p in all_logs:
            if p.exists():
                text = p.read_text(errors="replace")
                assert not [x for x in LOG_PROBLEMS if x in text], (p.name, text[-3000:])
