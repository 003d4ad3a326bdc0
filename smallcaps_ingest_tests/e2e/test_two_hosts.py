"""The test of record for a team: two "hosts", one Postgres instance, one Redis budget, one data tree.

Each host is a separate process tree with its own DAGSTER_HOME directory (deploy/dagster.yaml; no
local file shared between them) and its own copy of the events file. They materialize disjoint
partition ranges at the same time against one simulator whose limit equals the budget, 20 req/s.
Counted at the server: no 429 and never more than 20 requests in any 1 s window; the tree is exact
against ground truth; every partition is recorded once in the shared instance and `status` shows
the same on either host. The combined utilization over the overlap is printed (benchmarks/README.md
keeps the figures: on this shared 2-core machine it is not asserted).

A missing PostgreSQL or Redis fails this test, it never skips it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import redis

from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import REPO, TEST_KEY, cli_env
from smallcaps_ingest_tests.resilience_helpers import (
    assert_dataset_exact,
    kill_group,
    materialize,
    materialize_argv,
    smallcaps_ingest,
    write_events_subset,
)
from smallcaps_ingest_tests.team_helpers import (
    LOG_PROBLEMS,
    init_instance,
    materializations_per_partition,
    pg_database,
    team_home,
)

HOSTS = {"a": ("AAOI", "CLOV"), "b": ("DGLY", "IDEX")}  # disjoint ranges of the 8 symbols below
SYMBOLS = ["AAOI", "BBIG", "BRK.B", "CLOV", "DGLY", "FCEL", "GNUS", "IDEX"]
RANGE_SYMBOLS = {"a": {"AAOI", "BBIG", "BRK.B", "CLOV"}, "b": {"DGLY", "FCEL", "GNUS", "IDEX"}}
RPS = 20
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("hosts")
    events = tmp / "events.parquet"
    write_events_subset(events, SYMBOLS)
    prefix = f"smallcaps-test-{uuid.uuid4().hex[:12]}:"
    budget_url = f"redis://127.0.0.1:6379/0?key_prefix={prefix}"
    # page_cap 2000: ~700 requests, so the budget stays saturated for ~35 s
    with pg_database() as url, Simulator(SimConfig(rate_limit_rps=RPS, page_cap=2000, latency_ms=30)) as sim:
        envs = {}
        for h in HOSTS:
            own = tmp / f"host_{h}"
            own.mkdir()
            shutil.copy(events, own / "events.parquet")
            env = cli_env(own, POLYGON_BASE_URL=sim.base_url, POLYGON_API_KEY=TEST_KEY,
                          POLYGON_MAX_RPS=str(RPS), POLYGON_BUDGET_URL=budget_url,
                          SMALLCAPS_EVENTS=str(own / "events.parquet"), SMALLCAPS_DATA_DIR=str(tmp / "data"),
                          **team_home(own / "home", url))
            assert "postgres:" in (Path(env["DAGSTER_HOME"]) / "dagster.yaml").read_text()
            envs[h] = env
        init_instance(envs["a"])  # the one-time set-up (README): tables and the polygon_api pool
        materialize(envs["a"], "--select", "manifest", "--config-json", IN_PROCESS)
        sim.reset_counters()
        procs = {}
        for h, (first, last) in HOSTS.items():
            with open(tmp / f"host_{h}.log", "wb") as out:
                procs[h] = subprocess.Popen(
                    materialize_argv("--select", "event_windows", "--partition-range", f"{first}...{last}"),
                    cwd=REPO, env=envs[h], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
        try:
            rcs = {h: p.wait(timeout=400) for h, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    kill_group(p)
        log = sim.request_log()
        peak = sim.max_in_window(1.0)
        r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        keys = list(r.scan_iter(match=prefix + "*"))
        grants_kept = bool(keys)
        if keys:
            r.delete(*keys)
        statuses = {}
        for h in HOSTS:
            t = time.monotonic()
            out = smallcaps_ingest(envs[h], "status", "--json", timeout=120)
            statuses[h] = (out, time.monotonic() - t)
        per_partition = materializations_per_partition(envs["a"], SYMBOLS)
        yield {"tmp": tmp, "envs": envs, "rcs": rcs, "log": log, "peak": peak, "statuses": statuses,
               "per_partition": per_partition, "grants_kept": grants_kept}


def test_two_hosts_share_one_budget_and_one_instance(two_hosts: dict) -> None:
    tmp, log = two_hosts["tmp"], two_hosts["log"]
    assert two_hosts["rcs"] == {"a": 0, "b": 0}, [(tmp / f"host_{h}.log").read_text()[-3000:] for h in HOSTS]
    assert two_hosts["grants_kept"], "the grants were kept in Redis (the budget was the Redis one)"
    by_host = {h: [r.t for r in log if r.ticker in syms] for h, syms in RANGE_SYMBOLS.items()}
    assert all(by_host.values()) and sum(map(len, by_host.values())) == len(log)
    start = max(ts[0] for ts in by_host.values())
    end = min(ts[-1] for ts in by_host.values())
    overlap = end - start
    in_overlap = sum(1 for r in log if start <= r.t <= end)
    utilization = in_overlap / (RPS * overlap) if overlap > 0 else 0.0
    n429 = sum(r.status == 429 for r in log)
    print(f"two hosts: {len(log)} requests, {n429} x 429, peak {two_hosts['peak']} in 1 s at the server, "
          f"overlap {overlap:.1f}s, combined utilization over the overlap {utilization:.3f}; "
          f"status {two_hosts['statuses']['a'][1]:.2f}s (host a), "
          f"{two_hosts['statuses']['b'][1]:.2f}s (host b)")
    assert overlap > 10.0, overlap  # the two hosts really fetched at the same time
    assert n429 == 0
    assert two_hosts["peak"] <= RPS
    data = tmp / "data"
    assert_dataset_exact(data, pl.read_parquet(data / "manifest.parquet"))
    assert two_hosts["per_partition"] == {s: 1 for s in SYMBOLS}  # every partition recorded once
    for h in HOSTS:
        text = (tmp / f"host_{h}.log").read_text(errors="replace")
        assert not [p for p in LOG_PROBLEMS if p in text], (h, text[-3000:])


def test_either_hosts_status_sees_the_whole_team(two_hosts: dict) -> None:
    """Both hosts' `status` read the one Postgres instance (through Dagster's API) and the one tree."""
    seen = {}
    for h, (out, _took) in two_hosts["statuses"].items():
        assert out.returncode == 0, out.stderr[-3000:]
        st = json.loads(out.stdout)
        inst = st["instance"]
        assert inst["present"] and inst["materialized_partitions"] == len(SYMBOLS), inst
        assert st["symbols"]["complete"] == len(SYMBOLS) and st["events"]["partial"] == 0
        seen[h] = (inst["materialized_partitions"], st["events"]["done"], st["api"]["429s"])
    assert seen["a"] == seen["b"], seen
