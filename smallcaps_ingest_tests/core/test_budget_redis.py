"""The request budget on Redis (many hosts): the guarantees of the SQLite budget, counted at the server.

Tests on the shared Redis (127.0.0.1:6379) use their own key prefix and delete their keys; the
restart and outage tests start their own ``redis-server`` on a free loopback port. A missing
Redis fails these tests (connection refused), it never skips them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import redis

from smallcaps_ingest.config import Config
from smallcaps_ingest.core.polygon.budget import BudgetUnavailable, RequestBudget, open_budget
from smallcaps_ingest.core.polygon.budget_redis import RedisBudget
from smallcaps_ingest.core.polygon.client import PolygonClient
from smallcaps_ingest.core.polygon.stats import FetchStats
from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import REPO, TEST_KEY, ns, truth_frame

SHARED = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are deleted afterwards."""
    p = f"smallcaps-test-{uuid.uuid4().hex[:12]}:"
    yield p
    r = redis.Redis.from_url(SHARED)
    keys = list(r.scan_iter(match=p + "*"))
    if keys:
        r.delete(*keys)
    r.close()


def _url(prefix: str) -> str:
    return f"{SHARED}?key_prefix={prefix}"


class RedisServer:
    """A redis-server of the test's own on a free loopback port, without persistence."""

    def __init__(self, tmp: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


def test_budget_url_selects_the_backend(tmp_path: Path, prefix: str) -> None:
    env = {"DAGSTER_HOME": str(tmp_path / "home")}
    assert Config.from_env(env).budget_url == f"sqlite://{tmp_path}/home/polygon_budget.sqlite"
    env["POLYGON_BUDGET_PATH"] = str(tmp_path / "b.sqlite")  # the older setting maps on
    assert Config.from_env(env).budget_url == f"sqlite://{tmp_path}/b.sqlite"
    env["POLYGON_BUDGET_URL"] = _url(prefix)
    assert Config.from_env(env).budget_url == _url(prefix)  # the URL wins
    assert isinstance(open_budget(f"sqlite://{tmp_path}/b.sqlite", 10), RequestBudget)
    rb = open_budget(_url(prefix), 10, bucket="h")
    assert isinstance(rb, RedisBudget) and rb.keys == (f"{prefix}{{h}}:grants", f"{prefix}{{h}}:state")
    with pytest.raises(ValueError, match="POLYGON_BUDGET_URL='memcached://x'.*sqlite:// .*redis://"):
        open_budget("memcached://x", 10)
    assert "hunter2" not in RedisBudget(10, "redis://:hunter2@127.0.0.1:6379/0").url


def test_aimd_and_retry_after_are_shared_by_every_host(prefix: str) -> None:
    """Two budgets on one Redis (two hosts): a 429 on one cuts the rate of both, and its Retry-After
    holds the grants of both; an empty state first holds grants for the cold-start time."""
    a = RedisBudget(100, _url(prefix), bucket="x", cold_start=0.5)
    b = RedisBudget(100, _url(prefix), bucket="x", cold_start=0.5)
    assert 0.3 < a.try_acquire() <= 0.5  # new (or lost) state: nothing is granted at first
    time.sleep(0.5)
    assert b.try_acquire() == 0.0
    assert a.on_throttled() == pytest.approx(80, rel=0.01)
    assert b.on_throttled() == pytest.approx(80, rel=0.01)  # one cut per burst, for every host
    assert b.effective_rps < 81
    a.on_throttled(retry_after=1.5)
    assert 1.4 < b.try_acquire() <= 1.5  # the other host waits out the Retry-After too
    time.sleep(1.5)
    assert b.try_acquire() == 0.0
    assert b.effective_rps == pytest.approx(80 + 2 * 2.0, abs=1.5)  # +2 %/s of the budget since the cut


def test_a_grant_counts_until_its_request_is_sent(prefix: str) -> None:
    b = RedisBudget(2, _url(prefix), bucket="x", cold_start=0)
    assert b.try_acquire() == 0.0  # grant 1: never reports being sent
    assert b.try_acquire() == 0.0
    assert 0 < b.try_acquire() <= 0.002  # both in flight: full, poll until a send is reported
    b.mark_sent()  # grant 2 went on the wire now: it counts one window from now
    assert 0.99 < b.try_acquire() <= 1.02  # and grant 1 (unsent) still counts, for its lease
    r = redis.Redis.from_url(SHARED)
    scores = sorted(s for _, s in r.zrange(b.keys[0], 0, -1, withscores=True))
    (sec, usec) = r.time()
    now = sec + usec / 1e6
    assert abs(scores[0] - now) < 0.2 and 4.8 < scores[1] - now <= 5.0  # sent: now; pending: now + lease


def _proc_script(url: str, base: str, n: int, skew: float = 0.0) -> str:
    """One "host": a client on the Redis budget sending n one-page requests; its clock off by skew s."""
    return textwrap.dedent(f"""
        import time
        real = time.time
        time.time = lambda: real() + {skew}  # this host's clock is wrong; the budget must not care
        from smallcaps_ingest.core.polygon.budget_redis import RedisBudget
        from smallcaps_ingest.core.polygon.client import PolygonClient
        from smallcaps_ingest.core.polygon.stats import FetchStats
        b = RedisBudget(20, {url!r}, bucket="sim", cold_start=0)
        c = PolygonClient({base!r}, "k", b, workers=4)
        lo = 1709650800000000000
        st = FetchStats()
        for i in range({n}):
            c.fetch_range("trades", "DEAD", lo + i, lo + i + 10, st)
        print(st.total_requests, st.throttled)
    """)


@pytest.mark.parametrize("skews", [(0.0, 0.0), (-0.2, 0.2)], ids=["same-clock", "clocks-400ms-apart"])
def test_two_processes_share_one_redis_budget(prefix: str, skews: tuple[float, float]) -> None:
    """Two OS processes ("hosts"), one Redis budget of 20 req/s, the server's limit 20: never more
    than 20 in any second at the server and no 429, also when the hosts' clocks are 400 ms apart
    (each host's time.time() is off by -/+ 200 ms; the budget uses Redis's TIME)."""
    with Simulator(SimConfig(latency_ms=5, rate_limit_rps=20)) as s:
        procs = [
            subprocess.Popen([sys.executable, "-c", _proc_script(_url(prefix), s.base_url, 45, skew)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for skew in skews
        ]
        outs = [p.communicate(timeout=90) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
        assert sum(int(o.split()[0]) for o, _ in outs) == 90 == s.counters()["total"]
        log = s.request_log()
        assert sum(r.status == 429 for r in log) == 0
        assert s.max_in_window(1.0) <= 20
        span = log[-1].t - log[0].t
        assert span >= (90 - 20) / 20 * 0.99  # 90 requests at 20/s need >= 3.5 s
        print(f"redis budget, skews {skews}: 90 requests in {span:.2f}s, max in 1 s {s.max_in_window(1.0)}")


def _fetch_all(client: PolygonClient, work: list[tuple[str, int, int]], threads: int = 4) -> dict:
    """Fetch every (symbol, lo, hi) range on `threads` threads; returns {range: frame or exception}."""
    out: dict = {}

    def run(items: list[tuple[str, int, int]]) -> None:
        for item in items:
            try:
                out[item] = client.fetch_range("trades", item[0], item[1], item[2], FetchStats())
            except Exception as e:  # noqa: BLE001 - the test inspects it
                out[item] = e

    ts = [threading.Thread(target=run, args=(work[i::threads],)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=180)
    return out


def _ranges(n: int) -> list[tuple[str, int, int]]:
    lo = ns("2024-03-05T15:00:00")
    minute = 60 * 1_000_000_000
    return [(sym, lo + i * minute, lo + (i + 1) * minute) for i in range(n) for sym in ("AAOI", "BBIG")]


def test_redis_restarted_mid_run_fails_closed_and_the_run_completes_exact(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Redis killed mid-run and started again, empty, 0.4 s later: no request reaches the server
    while it is away, the client reconnects by itself, every range is exact, and the server never
    sees more than the budget in a second (the empty state's cold start covers the forgotten grants)."""
    with Simulator(SimConfig(latency_ms=20, rate_limit_rps=20, page_cap=200)) as sim:
        budget = RedisBudget(20, own_redis.url, bucket="sim", unavailable_timeout=30)
        client = PolygonClient(sim.base_url, TEST_KEY, budget, workers=4, read_timeout=10)
        work = _ranges(30)
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(_fetch_all(client, work)))
        runner.start()
        deadline = time.monotonic() + 60
        while sim.counters()["total"] < 40:  # well into the run
            assert time.monotonic() < deadline and runner.is_alive()
            time.sleep(0.01)
        own_redis.kill()
        killed = time.monotonic()
        time.sleep(0.4)  # back within one window: the grants it forgot still count at the server
        n_down = sim.counters()["total"]
        restarted = time.monotonic()
        own_redis.start()
        runner.join(timeout=180)
        client.close()
        log = sim.request_log()
    assert not runner.is_alive()
    bad = {k: v for k, v in result.items() if not isinstance(v, pl.DataFrame)}
    assert not bad, bad
    for (sym, lo, hi), got in result.items():
        want = truth_frame("trades", sym, lo, hi)
        assert got["sequence_number"].to_list() == want["sequence_number"].to_list()
    # nothing was granted while Redis was away (only requests granted before the kill arrive), nor
    # during the cold start of the state the new Redis began with
    during = [r for r in log if killed + 0.05 <= r.t < restarted + budget.cold_start - 0.1]
    assert during == [], during[:3]
    assert n_down == sum(1 for r in log if r.t < restarted)
    assert sum(r.status == 429 for r in log) == 0
    assert sim.max_in_window(1.0) <= 20
    print(f"redis restart: {len(log)} requests, {budget.outages} outage(s) seen by a call, "
          f"max in 1 s {sim.max_in_window(1.0)}")


def test_a_redis_that_never_returns_fails_the_run_with_a_clear_error(own_redis: RedisServer) -> None:
    """No Redis for longer than the budget's timeout: BudgetUnavailable naming the budget, after a
    bounded wait, and not one request sent without a grant."""
    with Simulator(SimConfig()) as sim:
        budget = RedisBudget(20, own_redis.url, bucket="sim", unavailable_timeout=2.0, cold_start=0)
        client = PolygonClient(sim.base_url, TEST_KEY, budget, workers=2, read_timeout=10)
        lo = ns("2024-03-05T15:00:00")
        client.fetch_range("trades", "AAOI", lo, lo + 10**9, FetchStats())
        before = sim.counters()["total"]
        own_redis.kill()
        t0 = time.monotonic()
        want = (rf"budget at redis://127.0.0.1:{own_redis.port}/0 .*unreachable"
                r".*POLYGON_BUDGET_TIMEOUT=2.*no request was sent without a grant")
        with pytest.raises(BudgetUnavailable, match=want):
            client.fetch_range("trades", "AAOI", lo, lo + 10**9, FetchStats())
        waited = time.monotonic() - t0
        client.close()
        assert sim.counters()["total"] == before  # fail closed: nothing went out
    assert 2.0 <= waited < 10.0, waited


def test_the_resource_uses_the_redis_budget(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """POLYGON_BUDGET_URL=redis://... reaches the client the Dagster resource builds."""
    from smallcaps_ingest.pipeline.resources import PolygonResource

    with Simulator(SimConfig()) as sim:
        res = PolygonResource(api_key=TEST_KEY, base_url=sim.base_url, max_rps=50, budget_url=_url(prefix))
        client = res.get_client()
        assert isinstance(client.budget, RedisBudget)
        client.budget.cold_start = 0
        lo = ns("2024-03-05T15:00:00")
        got = client.fetch_range("trades", "AAOI", lo, lo + 60 * 10**9, FetchStats())
        assert got.height == truth_frame("trades", "AAOI", lo, lo + 60 * 10**9).height
        host = sim.base_url.split("//", 1)[1]
        assert redis.Redis.from_url(SHARED).zcard(f"{prefix}{{{host}}}:grants") == 1
        client.close()
        client.budget.close()
    assert os.environ.get("POLYGON_BUDGET_URL") is None  # nothing leaked into this process's env
