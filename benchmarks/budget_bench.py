"""Three request budgets on one Redis, two processes ("hosts"), measured at the simulator.

    python benchmarks/budget_bench.py                  # every candidate, both scenarios, 12 s each
    python benchmarks/budget_bench.py --seconds 20 --candidates ours limits

Candidates: ``ours`` (smallcaps_ingest.core.polygon.budget_redis: Lua on Redis TIME, grant counts until the
request is sent, shared AIMD and Retry-After), ``limits`` (MovingWindowRateLimiter on
RedisStorage; wait = the window's reset time) and ``pyrate`` (pyrate-limiter's RedisBucket with a
blocking Limiter). Each host runs a PolygonClient with 8 threads sending one-page requests
(latency 50 ± 20 ms) for ``--seconds``. Scenario ``equal``: server limit = budget = 20 req/s;
``below``: server limit 10, budget 20 (only an adaptive budget can avoid 429s there).
Printed per run: requests, 429s, the most requests the server saw in any 1 s window, and
utilization = 200s over the two hosts' overlap / (limit x overlap).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid

import _bootstrap  # noqa: F401
import redis

from smallcaps_ingest.core.polygon.budget import BudgetBase
from smallcaps_ingest.simulator import SimConfig, Simulator

REDIS = "redis://127.0.0.1:6379/0"
BUDGET = 20
TICKERS = ("DEAD", "ZZZZ")  # both empty: one page per request; the ticker tells the hosts apart


class LimitsBudget(BudgetBase):
    """`limits` moving window: the rate is per call, but the window's key includes the amount, so a
    changed rate starts an empty window (no AIMD without losing the count); no send hook."""

    def __init__(self, max_rps: float, url: str, key: str):
        from limits import RateLimitItemPerSecond, storage, strategies

        self.max_rps = max_rps
        self.key = key
        self.limiter = strategies.MovingWindowRateLimiter(storage.RedisStorage(url))
        self.item = RateLimitItemPerSecond(int(max_rps))

    def try_acquire(self) -> float:
        if self.limiter.hit(self.item, self.key):
            return 0.0
        return max(0.0005, self.limiter.get_window_stats(self.item, self.key).reset_time - time.time())

    def _stamp(self, grant: object) -> None:
        pass

    def on_throttled(self, retry_after: float | None = None) -> float:
        return self.max_rps

    def close(self) -> None:
        pass


class PyrateBudget(BudgetBase):
    """pyrate-limiter RedisBucket: atomic Lua check-and-insert stamped with the client's clock;
    rates fixed when the bucket is built (no AIMD), no send hook."""

    def __init__(self, max_rps: float, url: str, key: str):
        from pyrate_limiter import Duration, Limiter, Rate, RedisBucket

        self.max_rps = max_rps
        bucket = RedisBucket.init([Rate(int(max_rps), Duration.SECOND)], redis.Redis.from_url(url), key)
        self.limiter = Limiter(bucket)

    def try_acquire(self) -> float:
        return 0.0 if self.limiter.try_acquire("polygon", blocking=True) else 0.01

    def _stamp(self, grant: object) -> None:
        pass

    def on_throttled(self, retry_after: float | None = None) -> float:
        return self.max_rps

    def close(self) -> None:
        pass


def make_budget(candidate: str, key: str) -> BudgetBase:
    if candidate == "ours":
        from smallcaps_ingest.core.polygon.budget_redis import RedisBudget

        return RedisBudget(BUDGET, f"{REDIS}?key_prefix={key}:", bucket="sim", cold_start=0)
    if candidate == "limits":
        return LimitsBudget(BUDGET, REDIS, key)
    return PyrateBudget(BUDGET, REDIS, key)


def host(candidate: str, key: str, base: str, ticker: str, seconds: float) -> None:
    """One host: 8 threads of one-page requests until `seconds` have passed."""
    import threading

    from smallcaps_ingest.core.polygon.client import PolygonClient
    from smallcaps_ingest.core.polygon.stats import FetchStats

    client = PolygonClient(base, "k", make_budget(candidate, key), workers=8)
    stop = time.monotonic() + seconds
    lo = 1709650800000000000

    def loop(i: int) -> None:
        st = FetchStats()
        n = 0
        while time.monotonic() < stop:
            client.fetch_range("trades", ticker, lo + i * 10**6 + n, lo + i * 10**6 + n + 10, st)
            n += 1

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def measure(candidate: str, server_limit: float, seconds: float) -> dict:
    key = f"bench-{uuid.uuid4().hex[:8]}"
    with Simulator(SimConfig(latency_ms=50, latency_jitter_ms=20, rate_limit_rps=server_limit)) as sim:
        procs = [
            subprocess.Popen([sys.executable, __file__, "--host", candidate, key, sim.base_url, t,
                              str(seconds)])
            for t in TICKERS
        ]
        for p in procs:
            p.wait(timeout=seconds + 120)
        log = sim.request_log()
        peak = sim.max_in_window(1.0)
    r = redis.Redis.from_url(REDIS)
    keys = list(r.scan_iter(match=f"*{key}*"))
    if keys:
        r.delete(*keys)
    first = max(min(x.t for x in log if x.ticker == t) for t in TICKERS)
    last = min(max(x.t for x in log if x.ticker == t) for t in TICKERS)
    served = sum(1 for x in log if first <= x.t <= last and x.status == 200)
    return {
        "candidate": candidate,
        "server_limit": server_limit,
        "requests": len(log),
        "429s": sum(x.status == 429 for x in log),
        "peak_1s": peak,
        "utilization": served / (server_limit * (last - first)),
        "rcs": [p.returncode for p in procs],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--host":
        candidate, key, base, ticker, seconds = sys.argv[2:7]
        host(candidate, key, base, ticker, float(seconds))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--candidates", nargs="+", default=["ours", "limits", "pyrate"])
    ap.add_argument("--scenarios", nargs="+", default=["equal", "below"])
    a = ap.parse_args()
    head = ("candidate", "server", "budget", "requests", "429s", "peak/1s", "util")
    print(f"{head[0]:10} " + " ".join(f"{h:>7}" for h in head[1:]))
    for scenario in a.scenarios:
        limit = BUDGET if scenario == "equal" else BUDGET / 2
        for c in a.candidates:
            m = measure(c, limit, a.seconds)
            print(f"{c:10} {limit:6g} {BUDGET:6d} {m['requests']:8d} {m['429s']:6d} {m['peak_1s']:7d} "
                  f"{m['utilization']:6.3f}  rc={m['rcs']}", flush=True)


if __name__ == "__main__":
    main()
