"""The request budget: one sliding-window limit shared by every thread and process on a host.

Polygon counts requests, not rows, so the budget is a count of request *grants* in a sliding
window. Grants live in a small SQLite file (``BEGIN IMMEDIATE`` gives a cross-process lock), so two
concurrent Dagster runs, or two step processes, draw from the same budget. The effective rate
is adapted with AIMD when the server answers 429 and is shared through the same file.

pyrate-limiter's SQLite bucket was considered: its rates are fixed when the bucket is built, so
AIMD would need a second limiter in front of it, and its blocking mode polls. This module computes
the exact wait and is covered by a two-process test counted at the server (benchmarks/README.md,
decision records D9 and D12).
"""

from __future__ import annotations

import math
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A grant counts against the window from the moment it is granted until one window after its
# request bytes were handed to the kernel (see ``mark_sent``): while a granted request waits for
# a connection or for the GIL it is counted as "now", so no later grant can assume it has left the
# window. The window is 1 % longer than a second to cover the server's own delay between the
# bytes arriving and it counting the request. The margin caps utilisation at 1 / (1 + margin)
# (benchmarks/README.md, decision record D9).
WINDOW_MARGIN = 0.01
# A grant whose request never reports being sent (the process died, the connection failed before
# the hook ran) stops counting as in flight after this long, and then ages out like any grant.
PENDING_LEASE = 5.0
# AIMD: multiplicative decrease on 429 (at most once per window), additive increase per second.
# The pair must converge below a server limit L: the cut (1 - DECREASE) * L must beat the regain
# INCREASE * budget, i.e. L > budget * INCREASE / (1 - DECREASE) = budget / 10 here (the pairs
# measured: decision record D9).
DECREASE_FACTOR = 0.8
DECREASE_EVERY = 0.5  # seconds: one cut per burst of 429s from requests already in flight
INCREASE_PER_SECOND = 0.02  # fraction of the configured budget regained each second
MIN_RATE = 0.05
MAX_RETRY_AFTER = 30.0  # seconds: a longer Retry-After is capped (the request is retried after 30 s)
CONNECT_TIMEOUT = 30.0  # seconds a process waits for the budget file's lock


class BudgetUnavailable(RuntimeError):
    """The shared budget could not be reached for longer than allowed: no request was sent."""


def open_budget(url: str, max_rps: float, bucket: str = "polygon", unavailable_timeout: float = 120.0):  # type: ignore[no-untyped-def]
    """The budget behind ``url`` (``POLYGON_BUDGET_URL``): one interface, two backends.

    ``sqlite://PATH`` (``sqlite:///abs/budget.sqlite``): a file shared by the processes of one host.
    ``redis://host:port/db`` (or ``rediss://``, ``unix://``): a Redis server shared by many hosts;
    a ``key_prefix=`` query parameter names its keys (default ``smallcaps:``).
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        path = url[len("sqlite://"):] if url.lower().startswith("sqlite://") else ""
        if not path:
            raise ValueError(f"POLYGON_BUDGET_URL={url!r}: expected sqlite:///path/to/budget.sqlite")
        return RequestBudget(max_rps, path, bucket=bucket)
    if scheme in ("redis", "rediss", "unix"):
        from smallcaps_ingest.core.polygon.budget_redis import RedisBudget

        return RedisBudget(max_rps, url, bucket=bucket, unavailable_timeout=unavailable_timeout)
    raise ValueError(
        f"POLYGON_BUDGET_URL={url!r}: the scheme must be sqlite:// (one host) or redis:// (many hosts)"
    )


class BudgetBase:
    """What both backends share: the blocking ``acquire`` loop, the window's shape, the send hook.

    A backend implements ``try_acquire`` (a grant now and 0.0, or the seconds to wait; it calls
    ``_pending`` with the grant's id), ``_stamp`` (the grant went on the wire now),
    ``on_throttled``, ``effective_rps`` and ``close``.
    """

    max_rps: float

    @staticmethod
    def _shape(rate: float) -> tuple[int, float]:
        """(requests allowed, window seconds) for a rate: N per second, or 1 per 1/rate seconds."""
        if rate >= 1.0:
            return math.floor(rate), 1.0 + WINDOW_MARGIN
        return 1, (1.0 / rate) * (1.0 + WINDOW_MARGIN)

    def try_acquire(self) -> float:
        raise NotImplementedError

    def on_throttled(self, retry_after: float | None = None) -> float:
        raise NotImplementedError

    def _stamp(self, grant: object) -> None:
        raise NotImplementedError

    def _pending(self, grant: object) -> None:
        """Remember this thread's grant until its request is sent (see :func:`mark_sent`)."""
        _PENDING.grant = (self, grant)

    def acquire(self) -> float:
        """Block until a request may be sent; returns the seconds spent waiting.

        Raises :class:`StopRequested`, before taking a grant, once this thread's stop signal
        (:func:`stoppable`) is set, also while waiting: a stopping run sends no further request."""
        waited = 0.0
        while True:
            raise_if_stopped()
            wait = self.try_acquire()
            if wait == 0.0:
                return waited
            pause(wait)
            waited += wait

    def mark_sent(self) -> None:
        """Stamp this thread's pending grant, if it is one of this budget's, as sent now."""
        grant = getattr(_PENDING, "grant", None)
        if grant is not None and grant[0] is self:
            mark_sent()


class RequestBudget(BudgetBase):
    """The SQLite backend (one host): ``acquire()`` returns once a request may be sent."""

    def __init__(self, max_rps: float, path: str | os.PathLike[str], bucket: str = "polygon"):
        if not max_rps or max_rps <= 0:
            raise ValueError(f"POLYGON_MAX_RPS must be > 0, got {max_rps!r}")
        self.max_rps = float(max_rps)
        self.bucket = bucket
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one SQLite connection per budget, used under this lock
        self._conn: sqlite3.Connection | None = None
        with self._connect() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS grants (bucket TEXT NOT NULL, t REAL NOT NULL)")
            conn.execute("CREATE INDEX IF NOT EXISTS grants_bt ON grants (bucket, t)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS aimd (bucket TEXT PRIMARY KEY, rate REAL NOT NULL,"
                " updated REAL NOT NULL, last_decrease REAL NOT NULL)"
            )
            conn.execute("CREATE TABLE IF NOT EXISTS pause (bucket TEXT PRIMARY KEY, until REAL NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=CONNECT_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
            _switch_to_wal(conn)
            conn.execute("PRAGMA synchronous=OFF")
            self._conn = conn
        return _Tx(self._conn)  # type: ignore[return-value]

    # -- AIMD state -------------------------------------------------------------------------
    def _rate(self, conn: sqlite3.Connection, now: float) -> float:
        row = conn.execute("SELECT rate, updated FROM aimd WHERE bucket=?", (self.bucket,)).fetchone()
        if row is None:
            return self.max_rps
        rate, updated = row
        regained = INCREASE_PER_SECOND * self.max_rps * max(0.0, now - updated)
        return min(self.max_rps, rate + regained)

    @property
    def effective_rps(self) -> float:
        with self._lock, self._connect() as conn:
            return self._rate(conn, time.time())

    def on_throttled(self, retry_after: float | None = None) -> float:
        """A 429 arrived: cut the shared rate (once per DECREASE_EVERY, however many were in flight);
        with its ``Retry-After`` (seconds), no process of the host gets a grant before then."""
        with self._lock, self._connect() as conn:
            now = time.time()
            if retry_after is not None and retry_after > 0:
                conn.execute(
                    "INSERT INTO pause (bucket, until) VALUES (?, ?) ON CONFLICT (bucket)"
                    " DO UPDATE SET until = max(until, excluded.until)",
                    (self.bucket, now + min(retry_after, MAX_RETRY_AFTER)),
                )
            row = conn.execute("SELECT last_decrease FROM aimd WHERE bucket=?", (self.bucket,)).fetchone()
            rate = self._rate(conn, now)
            if row is not None and now - row[0] < DECREASE_EVERY:
                return rate
            rate = max(MIN_RATE, rate * DECREASE_FACTOR)
            conn.execute(
                "INSERT OR REPLACE INTO aimd (bucket, rate, updated, last_decrease) VALUES (?,?,?,?)",
                (self.bucket, rate, now, now),
            )
            return rate

    # -- grants -----------------------------------------------------------------------------
    def try_acquire(self) -> float:
        """Take a grant now and return 0.0, or return how long to wait before trying again."""
        with self._lock, self._connect() as conn:
            now = time.time()
            paused = conn.execute("SELECT until FROM pause WHERE bucket=?", (self.bucket,)).fetchone()
            if paused is not None and paused[0] > now:  # a 429's Retry-After: nobody sends before it
                return paused[0] - now
            allowed, window = self._shape(self._rate(conn, now))
            conn.execute("DELETE FROM grants WHERE bucket=? AND t <= ?", (self.bucket, now - 60.0))
            times = [
                r[0]
                for r in conn.execute(
                    "SELECT t FROM grants WHERE bucket=? AND t > ? ORDER BY t DESC LIMIT ?",
                    (self.bucket, now - window, allowed),
                )
            ]
            if len(times) < allowed:
                # In flight: stamped in the future until the send re-stamps it (see mark_sent).
                cur = conn.execute(
                    "INSERT INTO grants (bucket, t) VALUES (?, ?)", (self.bucket, now + PENDING_LEASE)
                )
                self._pending(cur.lastrowid)
                return 0.0
            if times[-1] > now:  # the window is full of requests still being sent: poll briefly
                return 0.002
            # The oldest of the last `allowed` grants must leave the window first.
            return max(0.0005, times[-1] + window - now)

    def _stamp(self, grant: object) -> None:
        with self._lock, self._connect() as conn:
            conn.execute("UPDATE grants SET t = ? WHERE rowid = ?", (time.time(), grant))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_PENDING = threading.local()  # this thread's grant whose request has not been sent yet
_STOP = threading.local()  # this thread's stop signal (see stoppable)


class StopRequested(RuntimeError):
    """The run is stopping (SIGTERM, a run termination): no further request may be sent."""


@contextmanager
def stoppable(stop: threading.Event) -> Iterator[None]:
    """Within the block, this thread's budget waits and backoffs end with :class:`StopRequested`
    as soon as ``stop`` is set, and no grant is taken once it is.

    A thread-local signal rather than state on the budget: the budget is shared by every caller
    in the process, the stop belongs to one engine's workers (``FetchEngine`` enters this around
    each range it fetches, so every page and retry of the range checks it)."""
    previous = getattr(_STOP, "event", None)
    _STOP.event = stop
    try:
        yield
    finally:
        _STOP.event = previous


def current_stop() -> threading.Event | None:
    """This thread's stop signal, if it runs inside :func:`stoppable`."""
    return getattr(_STOP, "event", None)


def raise_if_stopped() -> None:
    stop = current_stop()
    if stop is not None and stop.is_set():
        raise StopRequested("stopping: no further request is sent")


def pause(seconds: float) -> None:
    """Sleep ``seconds``, or until this thread's stop signal is set (then StopRequested)."""
    stop = current_stop()
    if stop is None:
        time.sleep(seconds)
        return
    if stop.wait(seconds):
        raise StopRequested("stopping: no further request is sent")


def mark_sent() -> None:
    """Stamp this thread's pending grant with the moment its request went on the wire.

    Called by the HTTP connection right after the request bytes were written (transport.py). Until
    then the grant counts as in flight (stamped ``PENDING_LEASE`` ahead), so a request held up
    between grant and send — waiting for the GIL behind a large JSON decode, or for a connection —
    can never fall out of the window before the server has seen it. From the send on, the window
    counts from when the server could first have seen it, which makes budget+1 in one server-side
    second impossible, whatever the delays between grant and send.
    """
    grant = getattr(_PENDING, "grant", None)
    if grant is None:
        return
    _PENDING.grant = None
    budget, grant_id = grant
    budget._stamp(grant_id)


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the file.

    Switching the journal mode needs an exclusive lock, and SQLite answers "database is locked"
    at once instead of waiting out the busy timeout, so steps or runs that open a fresh budget
    file at the same moment would fail."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.005, 0.02))


class _Tx:
    """``with _Tx(conn):`` runs the block in one IMMEDIATE (write-locked) transaction."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
