"""``python -m smallcaps_ingest.simulator``: run a standalone simulator until SIGINT/SIGTERM.

For the demo and out-of-process benchmarks; every ``SimConfig`` knob has a flag.
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from smallcaps_ingest.simulator.config import SimConfig
from smallcaps_ingest.simulator.server import Simulator, is_loopback


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m smallcaps_ingest.simulator", description="Polygon v3 simulator"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--transfer-mb-s", type=float, default=None,
                   help="send each response body at this many MB/s (default: loopback speed)")
    p.add_argument("--rate-limit-rps", type=float, default=None)
    p.add_argument("--no-retry-after", action="store_true")
    p.add_argument("--error-5xx-rate", type=float, default=0.0)
    p.add_argument("--reset-rate", type=float, default=0.0)
    p.add_argument("--truncate-rate", type=float, default=0.0)
    p.add_argument("--page-cap", type=int, default=None)
    p.add_argument("--page-ends-at-day", action="store_true")
    p.add_argument("--duplicate-sequence-rate", type=float, default=0.0)
    p.add_argument("--identical-trade-rate", type=float, default=0.0)
    p.add_argument("--html-5xx-rate", type=float, default=0.0)
    p.add_argument("--hang-rate", type=float, default=0.0)
    p.add_argument("--stall-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="KEY=PLAN",
        help="restrict keys (repeatable); plans: advanced, developer, basic",
    )
    return p


def _config(p: argparse.ArgumentParser, a: argparse.Namespace) -> SimConfig:
    keys = None
    if a.key:
        keys = {}
        for kv in a.key:
            k, sep, plan = kv.partition("=")
            if not sep or not k:
                p.error(f"--key expects KEY=PLAN, got {kv!r}")
            keys[k] = plan
    return SimConfig(
        latency_ms=a.latency_ms,
        latency_jitter_ms=a.jitter_ms,
        transfer_bytes_per_s=a.transfer_mb_s * 1e6 if a.transfer_mb_s else None,
        rate_limit_rps=a.rate_limit_rps,
        rate_limit_retry_after=not a.no_retry_after,
        error_5xx_rate=a.error_5xx_rate,
        reset_rate=a.reset_rate,
        truncate_rate=a.truncate_rate,
        page_cap=a.page_cap,
        page_ends_at_day=a.page_ends_at_day,
        duplicate_sequence_rate=a.duplicate_sequence_rate,
        identical_trade_rate=a.identical_trade_rate,
        html_5xx_rate=a.html_5xx_rate,
        hang_rate=a.hang_rate,
        stall_rate=a.stall_rate,
        keys=keys,
        seed=a.seed,
    )


def main(argv: list[str] | None = None) -> None:
    """Run a standalone simulator until SIGINT/SIGTERM (for the demo and out-of-process benchmarks)."""
    p = _parser()
    a = p.parse_args(argv)
    if not is_loopback(a.host):
        p.error(f"refusing non-loopback host {a.host!r}")
    cfg = _config(p, a)
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    sim = Simulator(cfg, host=a.host, port=a.port).start()
    print(f"simulator listening on {sim.base_url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
