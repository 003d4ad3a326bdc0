"""The server: counters and the request log, loopback only, the CLI, and arrival stamps (the
kernel's where the platform has them, else stamped on read)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from smallcaps_ingest import simulator as simmod
from smallcaps_ingest.simulator import RequestRecord, SimConfig, Simulator, server
from smallcaps_ingest_tests.simulator.conftest import (
    DAY,
    REPO,
)


def test_counters_concurrency_and_windows(fresh: Simulator) -> None:
    fresh.config.latency_ms = 150
    s = requests.Session()
    s.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=8))
    s.headers["Authorization"] = "Bearer k"

    def one(i: int) -> int:
        return s.get(
            f"{fresh.base_url}/v3/trades/AAOI", params={"limit": 2, "timestamp": DAY}, timeout=30
        ).status_code

    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(one, range(16)))
    assert codes == [200] * 16
    c = fresh.counters()
    assert c["total"] == 16 and c["requests"]["trades"]["200"] == 16 and c["bytes"] > 0
    assert 4 <= c["max_concurrency"] <= 8
    log = fresh.request_log()
    assert [r.t for r in log] == sorted(r.t for r in log)
    assert all(r.rows == 2 and r.ticker == "AAOI" and r.endpoint == "trades" for r in log)
    assert fresh.max_in_window(10.0) == 16 and fresh.max_in_window(10.0, served_only=True) == 16
    assert 1 <= fresh.max_in_window(0.01) <= 8
    fresh.reset_counters()
    assert fresh.counters()["total"] == 0 and fresh.request_log() == [] and fresh.max_in_window() == 0


def test_refuses_non_loopback() -> None:
    with pytest.raises(ValueError):
        Simulator(host="0.0.0.0")
    with pytest.raises(SystemExit):
        simmod.main(["--host", "0.0.0.0", "--port", "0"])


def test_cli_subprocess_serves() -> None:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "smallcaps_ingest.simulator", "--port", str(port), "--page-cap", "7"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        timer = threading.Timer(20, proc.kill)
        timer.start()
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        timer.cancel()
        assert line == f"simulator listening on http://127.0.0.1:{port}"
        r = requests.get(
            f"http://127.0.0.1:{port}/v3/trades/AAOI", params={"apiKey": "k", "timestamp": DAY}, timeout=10
        )
        assert r.status_code == 200 and len(r.json()["results"]) == 7 and "next_url" in r.json()
        assert (
            "dagster"
            not in subprocess.run(
                [sys.executable, "-c", "import sys, smallcaps_ingest.simulator; print(sorted(sys.modules))"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def _held_arrival(sim: Simulator) -> tuple[RequestRecord, float]:
    """One request whose handler is held at the door for 0.3 s after its bytes arrived; its record
    and when it was sent (monotonic clock)."""
    host, port = sim.host, sim.port
    with sim._lock:  # hold every handler at the door for 0.3 s after the request arrived
        s = socket.create_connection((host, port))
        sent = time.monotonic()
        s.sendall(f"GET /v3/trades/AAOI?apiKey=k HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        time.sleep(0.3)
    s.settimeout(10)
    assert s.recv(12).startswith(b"HTTP/1.1")
    s.close()
    (rec,) = sim.request_log()
    return rec, sent


def test_arrivals_are_counted_when_the_bytes_reach_the_server() -> None:
    """The log and the limiter use the kernel's receive stamp, not when a handler got to it."""
    if sys.platform.startswith("linux"):  # the kernel's stamps are what this test exercises there
        with socket.socket() as sk:
            assert server._kernel_stamps(sk)
    with Simulator(SimConfig()) as sim:
        rec, sent = _held_arrival(sim)
        assert abs(rec.t - sent) < 0.05  # arrival: when it was sent
        assert rec.handled - rec.t > 0.25  # handled after the lock was released


def test_without_kernel_stamps_arrivals_are_stamped_on_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where SO_TIMESTAMPNS does not exist (not Linux) the handler stamps the bytes when its read
    returns: arrivals are still counted, in arrival order, and the limiter still counts them."""
    monkeypatch.setattr(server, "_SO_TIMESTAMPNS", None)
    with socket.socket() as sk:
        assert not server._kernel_stamps(sk)
    with Simulator(SimConfig()) as sim:
        rec, sent = _held_arrival(sim)
        assert abs(rec.t - sent) < 0.05  # stamped when read, before the handler waited
        assert rec.handled - rec.t > 0.25
        sim.reset_counters()
        sim.config.latency_ms = 50
        s = requests.Session()
        s.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=8))
        s.headers["Authorization"] = "Bearer k"
        url = f"{sim.base_url}/v3/trades/AAOI"
        with ThreadPoolExecutor(8) as ex:
            codes = list(ex.map(lambda _: s.get(url, params={"limit": 1}, timeout=30).status_code, range(24)))
        assert codes == [200] * 24
        log = sim.request_log()
        assert len(log) == 24 and sim.counters()["requests"]["trades"] == {"200": 24}
        assert [r.t for r in log] == sorted(r.t for r in log)
        assert all(r.t <= r.handled for r in log)
    with Simulator(SimConfig(rate_limit_rps=5)) as sim:
        s = requests.Session()
        s.headers["Authorization"] = "Bearer k"
        codes = [
            s.get(f"{sim.base_url}/v3/trades/AAOI", params={"limit": 1}, timeout=30).status_code
            for _ in range(15)
        ]
        assert codes[:5] == [200] * 5 and codes.count(429) >= 5
        assert sim.max_in_window(1.0, served_only=True) <= 5
        assert sim.max_in_window(1.0) == 15


def test_transfer_rate_paces_each_body_by_its_bytes(fresh: Simulator) -> None:
    """With ``transfer_bytes_per_s`` a body arrives no sooner than its bytes / rate after the
    request, whatever its size, and a body of a few hundred bytes is not held to a big one's."""
    rate = 2_000_000.0
    fresh.config.transfer_bytes_per_s = rate
    s = requests.Session()
    s.headers["Authorization"] = "Bearer k"
    url = f"{fresh.base_url}/v3/quotes/AAOI"

    def timed(limit: int) -> tuple[int, float]:
        t0 = time.monotonic()
        r = s.get(url, params={"limit": limit, "timestamp": DAY}, timeout=30)
        assert r.status_code == 200
        return len(r.content), time.monotonic() - t0

    big, big_s = timed(8000)
    small, small_s = timed(1)
    assert big > 1_000_000 and small < 2_000  # the bodies the bounds are computed from
    assert big_s >= big / rate
    assert small_s >= small / rate
    assert small_s < big / rate  # paced by its own bytes, not by a fixed delay
