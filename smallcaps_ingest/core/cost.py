"""What a request costs in time: its share of the budget, and its transfer and decoding.

The budget counts requests, so fewer requests looked free; but a merged range's page also takes
time to arrive and be decoded (a 50,000-row page is ~12 MB of JSON), and a worker waits for it
all that time. With ``workers`` in flight, requests go out at ``max_rps`` only while each takes at
most ``workers / max_rps`` seconds; beyond that the workers, not the budget, set the pace, and the
budget idles (benchmarks/README.md, decision record D18).

:class:`TransferModel` learns those seconds from the responses (request sent to page decoded):
a least-squares line ``latency + bytes x seconds per byte``, shrunk towards a prior (100 ms,
25 MB/s), and bytes per row per endpoint (prior 250, the real fixtures' 236-276). The planner asks
it for a :class:`MergeRule` (:meth:`TransferModel.rule`): the most rows a merged range's page may
hold so the budget stays the bottleneck, and what a range costs. Thread-safe: the client's
workers observe, the engine's thread plans.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

PAGE_ROWS = 50_000
PRIOR_LATENCY_S = 0.1
PRIOR_BYTES_PER_S = 25e6
PRIOR_BYTES_PER_ROW = 250.0
# Weight of the priors, in responses (the line) and in rows (bytes per row).
PRIOR_RESPONSES = 4.0
PRIOR_ROWS = 50_000.0
# Past responses fade by this factor per new one, so the fit follows a server (or host) that
# slows down or speeds up: ~1,000 responses of memory.
DECAY = 0.999
# The mean seconds a page took fade faster (~100 responses): they answer what the planner merged
# lately. The rule aims the mean at MEAN_TARGET x workers / max_rps (a margin for the spread of
# arrivals), lets a page take GAIN seconds longer than workers / max_rps per second the mean falls
# short of that, and starts from the aim itself, with PRIOR_MEAN_RESPONSES responses' weight.
MEAN_DECAY = 0.99
MEAN_TARGET = 0.85
GAIN = 4.0
PRIOR_MEAN_RESPONSES = 10.0


class TransferModel:
    """Seconds per response learned from the responses observed (see the module docstring)."""

    def __init__(
        self,
        latency_s: float = PRIOR_LATENCY_S,
        bytes_per_s: float = PRIOR_BYTES_PER_S,
        bytes_per_row: float = PRIOR_BYTES_PER_ROW,
    ):
        self._lock = threading.Lock()
        # sums of the line's points (x = bytes, y = seconds): n, sx, sy, sxx, sxy; the prior's
        # points are half at an empty page and half at a full one, on the prior line
        full = PAGE_ROWS * bytes_per_row
        pts = ((0.0, latency_s), (full, latency_s + full / bytes_per_s))
        half = PRIOR_RESPONSES / 2
        self._s = [PRIOR_RESPONSES, *(half * v for v in (sum(x for x, _ in pts), sum(y for _, y in pts),
                                                         sum(x * x for x, _ in pts),
                                                         sum(x * y for x, y in pts)))]
        self._prior = list(self._s)
        self._mean = [0.0, 0.0]  # faded (responses, seconds)
        self._bpr = {k: [PRIOR_ROWS * bytes_per_row, PRIOR_ROWS] for k in ("trades", "quotes")}

    def observe(self, kind: str, rows: int, nbytes: int, seconds: float) -> None:
        """One response of ``rows`` rows in ``nbytes`` bytes took ``seconds`` (sent to decoded)."""
        if seconds <= 0 or nbytes < 0:
            return
        with self._lock:
            s = self._s
            for i, v in enumerate((1.0, nbytes, seconds, nbytes * nbytes, nbytes * seconds)):
                # fade towards the prior, not towards nothing: the prior always keeps its weight
                s[i] = self._prior[i] + (s[i] - self._prior[i]) * DECAY + v
            self._mean = [self._mean[0] * MEAN_DECAY + 1.0, self._mean[1] * MEAN_DECAY + seconds]
            if rows > 0:
                cell = self._bpr.setdefault(kind, [PRIOR_ROWS * PRIOR_BYTES_PER_ROW, PRIOR_ROWS])
                cell[0] += nbytes
                cell[1] += rows

    def line(self) -> tuple[float, float]:
        """(latency seconds, seconds per byte) of the fitted line (both kept positive)."""
        with self._lock:
            n, sx, sy, sxx, sxy = self._s
        var = sxx - sx * sx / n
        slope = (sxy - sx * sy / n) / var if var > 0 else 0.0
        slope = max(slope, 1e-12)
        return max(0.0, (sy - slope * sx) / n), slope

    def bytes_per_row(self, kind: str) -> float:
        with self._lock:
            b, r = self._bpr.get(kind, (PRIOR_ROWS * PRIOR_BYTES_PER_ROW, PRIOR_ROWS))
        return b / r

    def seconds(self, kind: str, rows: float) -> float:
        """Expected seconds of one page of ``rows`` rows (at most a page's)."""
        latency, per_byte = self.line()
        return latency + min(rows, PAGE_ROWS) * self.bytes_per_row(kind) * per_byte

    def mean_seconds(self, prior: float, weight: float = PRIOR_MEAN_RESPONSES) -> float:
        """The faded mean seconds of the responses observed, shrunk towards ``prior``."""
        with self._lock:
            n, total = self._mean
        return (weight * prior + total) / (weight + n)

    def rule(self, kind: str, workers: int, max_rps: float) -> MergeRule:
        """How ranges of ``kind`` may merge at ``workers`` in flight and a budget of ``max_rps``.

        By Little's law the budget stays the bottleneck while the pages take at most
        ``workers / max_rps`` seconds *on average*. So a merged range may hold the rows whose page
        takes at most an allowance: ``workers / max_rps`` while the pages lately took the aim
        (``MEAN_TARGET`` of it, the prior) or more, and more while they took less (a few big pages
        among many small ones keep the budget busy); all rows, ``inf``, when even a full page fits.
        Never less: pages slower than the aim mean a starved host or link, where splitting ranges
        adds requests whose fixed cost the workers pay too (benchmarks/README.md, D18). The cost
        stays pages, as the budget counts them. When the latency alone
        exceeds ``workers / max_rps`` the workers are the bottleneck whatever is planned (too few
        for the budget), and the cost is the workers' seconds: a merge pays while the gap rows it
        adds take less time than the requests it saves."""
        latency, per_byte = self.line()
        per_row = per_byte * self.bytes_per_row(kind)
        if max_rps <= 0:
            return MergeRule()
        budget_s = workers / max_rps
        if budget_s > latency:
            aim = MEAN_TARGET * budget_s
            allowance = budget_s + GAIN * max(0.0, aim - self.mean_seconds(aim))
            rows = max(0.0, allowance - latency) / per_row
            return MergeRule(math.inf if rows >= PAGE_ROWS else rows)
        return MergeRule(cost=lambda r: pages(r) * latency + r * per_row)


# Seconds a worker spends per request (round trip + parse), for sizing the pool (Little's law).
REQUEST_SECONDS = 0.4
MAX_DEFAULT_WORKERS = 32


def default_workers(max_rps: float) -> int:
    """Workers that keep ``max_rps`` busy: requests in flight = rate x seconds per request, never
    fewer than 12 and at most 32 (each worker adds to peak RSS). The seconds per request are
    those of a multi-day range's large page, not of a small page (benchmarks/throughput.py)."""
    return min(MAX_DEFAULT_WORKERS, max(12, math.ceil(max_rps * REQUEST_SECONDS)))


def pages(rows: float) -> int:
    """Pages (requests) a range of ``rows`` expected rows takes."""
    return max(1, math.ceil(rows / PAGE_ROWS))


@dataclass(frozen=True)
class MergeRule:
    """What the planner's partition is given per endpoint: the most rows a merged range may hold,
    and the cost of a range of ``rows`` rows that it minimizes (pages: the budget's count)."""

    max_rows: float = math.inf
    cost: Callable[[float], float] = pages


#: The planner without time in it: fewest pages within the over-fetch bound.
PAGES_ONLY = MergeRule()
