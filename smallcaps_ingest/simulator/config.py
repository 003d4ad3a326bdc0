"""The simulator's knobs: what the tape holds, how the API pages, and which faults it injects.

One mutable dataclass because the server reads it on every request: a test may turn a fault on or
off while the simulator runs, and the next request sees it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SimConfig:
    """Fault and behaviour knobs; read on every request, so tests may mutate them while running."""

    # ---- faults (faults.py) ----
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    #: bytes per second each response's body is sent at (its own link, streamed in chunks, so a
    #: big page takes bytes / rate to arrive as over a real network); None: as fast as loopback
    transfer_bytes_per_s: float | None = None
    # ---- API (api.py): requests per second before a 429, and whether it says when to retry ----
    rate_limit_rps: float | None = None
    rate_limit_retry_after: bool = True
    # ---- faults (faults.py): shares of requests answered 5xx, reset, or with a truncated body ----
    error_5xx_rate: float = 0.0
    reset_rate: float = 0.0
    truncate_rate: float = 0.0
    # ---- API (api.py): at most this many rows per page, whatever `limit` asks ----
    page_cap: int | None = None
    #: pages end after each ET day's last row (a page may hold fewer than `limit` rows, next_url set)
    page_ends_at_day: bool = False
    # ---- market (market.py): the tape's genuine duplicates ----
    #: share of trades that reuse the previous trade's sequence_number (genuine duplicates)
    duplicate_sequence_rate: float = 0.0
    #: share of trades served twice, identical in every field
    identical_trade_rate: float = 0.0
    # ---- faults (faults.py): what a proxy in front of the API produces ----
    #: share of requests answered 502/504 with a proxy's HTML page (text/html), not the API's JSON
    html_5xx_rate: float = 0.0
    #: share of requests read and never answered (no status line, connection held open)
    hang_rate: float = 0.0
    #: share of 200s whose headers and part of the body are sent, then nothing more
    stall_rate: float = 0.0
    # ---- API (api.py): key -> plan ("advanced", "developer", ...); None accepts any key ----
    keys: dict[str, str] | None = None
    #: seeds the fault draws, so a run's faults repeat
    seed: int = 0
