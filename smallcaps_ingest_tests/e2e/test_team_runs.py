"""More runs in the two-host setting (issue 19, part 3): a third run waits for a pool slot, a run
SIGKILLed on one host is failed, retried and gives its slot back.

Both tests run the team deployment of test_two_hosts: hosts with their own DAGSTER_HOME
(deploy/dagster.yaml), one Postgres instance, one Redis budget, one data tree, against the
simulator. Each test's docstring says what it runs and asserts. A missing PostgreSQL or Redis fails
them, they never skip.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import dagster as dg
import polars as pl
import yaml

from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import BIN, REPO, TEST_KEY
from smallcaps_ingest_tests.resilience_helpers import (
    assert_dataset_exact,
    kill_group,
    materialize,
    materialize_argv,
    tmp_files,
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
KILL_SYMBOLS = ["AAOI", "BBIG"]
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quick_monitoring(home: Path) -> None:
    """deploy/dagster.yaml with a 1 s monitoring poll and a pool of one slot (else as shipped)."""
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    config["run_monitoring"]["poll_interval_seconds"] = 1
    config["concurrency"]["pools"]["default_limit"] = 1
    assert config["run_retries"]["enabled"] and config["run_monitoring"]["free_slots_after_run_end_seconds"]
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        with open(f"/proc/{pid}/stat") as fh:
            pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


def _run_start_pid(env: dict[str, str], run_id: str) -> int | None:
    with team_instance(env) as instance:
        starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_START)  # type: ignore[attr-defined]
        return starts[0].dagster_event.pid if starts and starts[0].dagster_event else None


def _retries_of(env: dict[str, str], run_id: str) -> list[dg.DagsterRun]:
    with team_instance(env) as instance:
        return [r for r in instance.get_runs() if r.tags.get("dagster/parent_run_id") == run_id]  # type: ignore[attr-defined]


def _engine_messages(env: dict[str, str], run_id: str) -> list[str]:
    with team_instance(env) as instance:
        return [e.message for e in instance.all_logs(  # type: ignore[attr-defined]
            run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)]


def _records(env: dict[str, str], symbol: str) -> list[tuple[str, bool]]:
    """(run id, is a checkpoint) of every event_windows materialization of a partition."""
    with team_instance(env) as instance:
        records = instance.fetch_materializations(  # type: ignore[attr-defined]
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("event_windows"), asset_partitions=[symbol]), limit=20
        ).records
    out = []
    for r in records:
        value = r.asset_materialization.metadata.get("checkpoint")
        out.append((r.run_id, bool(getattr(value, "value", value))))
    return out


def test_run_killed_on_another_host_is_failed_retried_and_frees_its_slot(tmp_path: Path) -> None:
    """A run on host b, SIGKILLed: it is marked failed, retried, its pool slot comes back, nothing is lost.

    The team deployment with the DefaultRunLauncher: host b serves the code (``dagster api grpc``, its own
    DAGSTER_HOME and environment), host a runs the daemon on a workspace that points at host b's server;
    one Postgres instance, one Redis budget, one data tree. A range run submitted on host a is launched
    by the daemon on host b (the run process is a child of host b's code server), and SIGKILLed there
    mid-fetch. Who notices (Dagster 1.13.27, read in its code): the DefaultRunLauncher has no run-worker
    health check, so run monitoring does not look at STARTED runs; the code server that launched the run
    checks its run processes every 0.5 s and reports a dead one failed. Run monitoring (a 1 s poll here)
    then frees the dead run's pool slot ``free_slots_after_run_end_seconds`` (30 s) after its end, and
    run retries (``run_retries``, on in deploy/dagster.yaml) launch a new run from the failure. The pool
    has one slot here, so the retry can fetch only once the dead run's slot was freed. A whole host
    lost (its code server too) is not detected: README "Running it for a team".
    """
    events = tmp_path / "events.parquet"
    write_events_subset(events, KILL_SYMBOLS)
    prefix = f"smallcaps-test-{uuid.uuid4().hex[:12]}:"
    budget_url = f"redis://127.0.0.1:6379/0?key_prefix={prefix}"
    port = _free_port()
    # slow enough that the run is still fetching when it is killed
    with pg_database() as url, Simulator(SimConfig(latency_ms=100, page_cap=1000)) as sim:
        envs = host_envs(tmp_path, events, url, POLYGON_BASE_URL=sim.base_url, POLYGON_API_KEY=TEST_KEY,
                         POLYGON_MAX_RPS="10", POLYGON_BUDGET_URL=budget_url)
        for env in envs.values():
            _quick_monitoring(Path(env["DAGSTER_HOME"]))
        env_a, env_b = envs["a"], envs["b"]
        init_instance(env_a, pool_limit=1)
        materialize(env_a, "--select", "manifest", "--config-json", IN_PROCESS)
        workspace = tmp_path / "workspace_a.yaml"  # host a loads the code from host b's server
        workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
            "host": "127.0.0.1", "port": port, "location_name": "smallcaps_ingest"}}]}))
        slog, dlog = tmp_path / "code_server_b.log", tmp_path / "daemon_a.log"
        logs = (slog, dlog)
        with open(slog, "wb") as out:
            server = subprocess.Popen(
                [str(BIN / "dagster"), "api", "grpc", "-m", "smallcaps_ingest",
                 "-h", "127.0.0.1", "-p", str(port)],
                cwd=REPO, env=env_b, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            wait_for("host b's code server", lambda: subprocess.run(
                [str(BIN / "dagster"), "api", "grpc-health-check", "-h", "127.0.0.1", "-p", str(port)],
                env=env_b, capture_output=True, timeout=60).returncode == 0, 300, logs)
            with daemon(env_a, dlog, workspace) as d:
                wait_daemon_ready(dlog, timeout=180)
                first = str(uuid.uuid4())
                tags = {"dagster/asset_partition_range_start": KILL_SYMBOLS[0],
                        "dagster/asset_partition_range_end": KILL_SYMBOLS[-1]}
                launched = subprocess.run(
                    [str(BIN / "dagster"), "job", "launch", "-w", str(workspace),
                     "-j", "ingest_event_windows", "--tags", json.dumps(tags),
                     "--config-json", IN_PROCESS, "--run-id", first],
                    cwd=REPO, env=env_a, capture_output=True, text=True, timeout=300,
                )
                assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-3000:]
                wait_for("the run holds the slot", lambda: first in pool_state(env_a)[0], 300, logs)
                pid = wait_for("the run's process", lambda: _run_start_pid(env_a, first), 120, logs)
                assert server.pid in _ancestors(pid), "the run runs under host b's code server"
                wait_for("the run's requests", lambda: len(sim.request_log()) >= 30, 120, logs)
                os.kill(pid, signal.SIGKILL)

                wait_for("the killed run marked failed",
                         lambda: run_statuses(env_a)[first] == "FAILURE", 120, logs)
                retry = wait_for("the retried run", lambda: _retries_of(env_a, first), 300, logs)[0]
                wait_for("the retried run done", lambda: run_statuses(env_a)[retry.run_id] in (
                    "SUCCESS", "FAILURE", "CANCELED"), 600, logs)
                assert d.poll() is None, "the daemon died"
        finally:
            kill_group(server)
            drop_redis_keys(prefix)

        statuses = run_statuses(env_a)
        assert statuses[first] == "FAILURE" and statuses[retry.run_id] == "SUCCESS", statuses
        assert len(_retries_of(env_a, first)) == 1, _retries_of(env_a, first)
        assert retry.tags.get("dagster/retry_number") == "1", retry.tags
        crash = [m for m in _engine_messages(env_a, first) if f"Run execution process for {first}" in m]
        assert crash, _engine_messages(env_a, first)  # host b's code server reported it
        # the slot came back: the retry (pool of one) ran its step after the dead run ended
        dead = event_times(env_a, first)
        retried_step = event_times(env_a, retry.run_id, "event_windows")
        assert retried_step["STEP_START"][0] > dead["PIPELINE_FAILURE"][0], (dead.keys(), retried_step)
        assert pool_state(env_a) == ([], [])
        # nothing lost: the tree exact, no partial file, each partition's one full record is the retry's
        data = tmp_path / "data"
        assert_dataset_exact(data, pl.read_parquet(data / "manifest.parquet"))
        assert tmp_files(data) == []
        for s in KILL_SYMBOLS:
            full = [run for run, ckpt in _records(env_a, s) if not ckpt]
            assert full == [retry.run_id], (s, _records(env_a, s), first)
        print(f"killed run {first[:8]} on host b: failed by its code server; retried as {retry.run_id[:8]}")
        for p in logs:
            text = p.read_text(errors="replace")
            assert not [x for x in LOG_PROBLEMS if x in text], (p.name, text[-3000:])
