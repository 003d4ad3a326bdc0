"""Figures of a fetch: requests by endpoint, pages, 429s, retries and errors by cause, bytes, rows.

One ``FetchStats`` per symbol (the client counts into the one it is handed); a run's figures are
the symbols' merged. The operations views show ``error_counts`` and the run metadata ``as_dict``.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class FetchStats:
    """Figures for one fetch (a symbol, or a whole run when merged). Thread-safe."""

    requests: Counter[str] = field(default_factory=Counter)  # by endpoint
    pages: int = 0
    throttled: int = 0  # 429 answers
    retries: Counter[str] = field(default_factory=Counter)  # by cause
    bytes: int = 0
    rows_raw: int = 0
    rows_kept: int = 0
    rows_inside: int = 0  # raw rows inside the event windows (a merged range's others are its gaps)
    budget_wait_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)  # failures that reached us, by type
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw: float) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def count(self, counter: str, key: str, n: int = 1) -> None:
        with self._lock:
            getattr(self, counter)[key] += n

    def merge(self, other: FetchStats) -> None:
        with self._lock:
            self.requests.update(other.requests)
            self.retries.update(other.retries)
            self.errors.update(other.errors)
            self.pages += other.pages
            self.throttled += other.throttled
            self.bytes += other.bytes
            self.rows_raw += other.rows_raw
            self.rows_kept += other.rows_kept
            self.rows_inside += other.rows_inside
            self.budget_wait_s += other.budget_wait_s

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def error_counts(self) -> dict[str, int]:
        """Errors by type, as the operations views show them (429, 5xx, timeouts, resets...)."""
        out = Counter({"429": self.throttled})
        for cause, n in self.retries.items():
            if cause != "429":
                out[cause] += n
        out.update(self.errors)
        return {k: v for k, v in sorted(out.items()) if v}

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.total_requests,
            "requests_by_endpoint": dict(self.requests),
            "pages": self.pages,
            "429s": self.throttled,
            "retries": sum(self.retries.values()),
            "retries_by_cause": dict(self.retries),
            "bytes": self.bytes,
            "rows_raw": self.rows_raw,
            "rows_kept": self.rows_kept,
            "rows_inside": self.rows_inside,
            "budget_wait_s": round(self.budget_wait_s, 3),
            "errors_by_type": self.error_counts(),
        }
