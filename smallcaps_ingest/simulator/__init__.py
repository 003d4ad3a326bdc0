"""A Polygon/Massive v3-compatible trades and NBBO quotes server, bundled as the test peer and demo source.

Why it exists: the platform must be testable, demoable and benchmarkable without a paid API key and
without the network. It speaks the real ``/v3/trades/{ticker}`` and ``/v3/quotes/{ticker}`` wire
format (field names and types copied from the upstream client's fixtures), and it can inject the
faults a production client must survive.

Read it in this order:

- ``config.py``: ``SimConfig``, every knob;
- ``market.py``: the synthetic tape, a pure function of (kind, ticker, minute), and ``ground_truth``;
- ``api.py``: what a v3 request means and what it is answered (paging, cursors, auth, 429s);
- ``faults.py``: 5xx, resets, truncation, latency, and a proxy's HTML pages, hangs and stalls;
- ``server.py``: ``Simulator``, the loopback HTTP server with its request log and counters;
- ``cli.py``: ``python -m smallcaps_ingest.simulator``; ``sample.py``: the demo's sample events.

Nothing under ``smallcaps_ingest.core`` imports this package; it imports only the trading calendar.
"""

from smallcaps_ingest.simulator.cli import main
from smallcaps_ingest.simulator.config import SimConfig
from smallcaps_ingest.simulator.market import LIQUIDITY, clear_cache, ground_truth, liquidity
from smallcaps_ingest.simulator.server import RequestRecord, Simulator, max_in_window

__all__ = [
    "LIQUIDITY",
    "RequestRecord",
    "SimConfig",
    "Simulator",
    "clear_cache",
    "ground_truth",
    "liquidity",
    "main",
    "max_in_window",
]
