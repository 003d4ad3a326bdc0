"""The client's HTTP plumbing: its retry policy and connections that report their sends.

``BudgetedRetry`` is the urllib3 ``Retry`` every request of :class:`~.client.PolygonClient` goes
through (see the client's docstring for what it retries and what it cannot). The connection
classes stamp the thread's budget grant the moment a request is on the wire (``mark_sent``) and
list the connection under the thread's stop signal, so :func:`abort_requests` can cut a stopping
run's requests in flight.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import weakref
from collections.abc import Mapping

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    InvalidHeader,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
)
from urllib3.util.retry import RequestHistory, Retry

from smallcaps_ingest.core.polygon.budget import BudgetBase, current_stop, mark_sent, pause
from smallcaps_ingest.core.polygon.stats import FetchStats

MAX_THROTTLED = 12  # attempts at a request answered 429, on top of the failures ``max_retries`` allows
MAX_RETRY_AFTER_S = 30.0  # the longest a 429's Retry-After holds this thread

current = threading.local()  # the FetchStats and endpoint of the request running in this thread


def _stats() -> FetchStats | None:
    return getattr(current, "stats", None)


def take_grant(budget: BudgetBase, stats: FetchStats | None) -> None:
    """One budget grant for one attempt on the wire, counted under this thread's endpoint."""
    waited = budget.acquire()
    if stats is not None:
        stats.add(budget_wait_s=waited)
        stats.count("requests", getattr(current, "endpoint", "other"))


def is_html(headers: Mapping[str, str], body: bytes = b"") -> bool:
    """A proxy's or CDN's error page (nginx, Cloudflare...), not an answer of the API (JSON)."""
    return "html" in (headers.get("Content-Type") or "").lower() or body.lstrip()[:1] == b"<"


def cause_of(error: Exception | None, response: object | None) -> str:
    """Why a request is retried or failed, as counted in the figures: ``429``, ``5xx``,
    ``5xx_html`` (a 5xx whose body is an HTML page: a proxy in front of the API), another status,
    ``connect`` (refused), ``connect_timeout``, ``read_timeout`` (no answer within the read
    timeout: a hung server, or one that stalls mid-body), ``reset``."""
    if response is not None and getattr(response, "status", None):
        status = int(response.status)  # type: ignore[attr-defined]
        if status >= 500:
            return "5xx_html" if is_html(response.headers) else "5xx"  # type: ignore[attr-defined]
        return str(status)
    if isinstance(error, NewConnectionError):  # a subclass of ConnectTimeoutError in urllib3 2
        return "connect"
    if isinstance(error, ConnectTimeoutError):
        return "connect_timeout"
    if isinstance(error, ReadTimeoutError):
        return "read_timeout"
    if isinstance(error, ProtocolError):
        return "reset"
    return type(error).__name__ if error else "other"


class BudgetedRetry(Retry):
    """The client's retry policy (see the module docstring): a grant before every retry, each
    retry counted by cause, and 429s through the shared budget with their own allowance."""

    def __init__(self, *args: object, budget: BudgetBase | None = None, throttles: int = MAX_THROTTLED - 1,
                 **kw: object):
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.budget = budget
        self.throttles = throttles  # 429 retries left

    def new(self, **kw: object) -> BudgetedRetry:  # type: ignore[override]
        kw.setdefault("budget", self.budget)
        kw.setdefault("throttles", self.throttles)
        return super().new(**kw)  # type: ignore[return-value]

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):  # type: ignore[no-untyped-def]  # noqa: E501
        if response is not None and response.status == 429:
            return self._throttled(method, url, response, _pool)
        # counted once it is a retry: the last attempt's failure (MaxRetryError) is the caller's error
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        stats = _stats()
        if stats is not None:
            stats.count("retries", cause_of(error, response))
        return retry

    def _throttled(self, method, url, response, pool) -> BudgetedRetry:  # type: ignore[no-untyped-def]
        """Every 429 answer: counted, and it cuts the shared rate (with its Retry-After, shared by
        every process on the budget). Past the allowance the 429 goes back to the client."""
        stats = _stats()
        if stats is not None:
            stats.add(throttled=1)
        if self.budget is not None:
            self.budget.on_throttled(self._retry_after(response))
        history = (*self.history, RequestHistory(method, url, None, 429, None))
        retry = self.new(throttles=self.throttles - 1, history=history)
        if retry.throttles < 0:
            raise MaxRetryError(pool, url, ResponseError("too many 429 answers"))
        return retry

    def _retry_after(self, response) -> float | None:  # type: ignore[no-untyped-def]
        """The Retry-After in seconds (urllib3 reads whole seconds and dates; the API may send a
        fraction), None when absent or unreadable."""
        value = response.headers.get("Retry-After") if response is not None else None
        if not value or not self.respect_retry_after_header:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            with contextlib.suppress(InvalidHeader):
                return self.get_retry_after(response)
        return None

    def sleep(self, response=None) -> None:  # type: ignore[no-untyped-def]
        """urllib3's sleep, made stoppable, then the next attempt's grant."""
        delay = self._retry_after(response)
        if response is not None and response.status == 429:
            if delay is None:  # doubling from 0.5 s with each 429 of this request, jittered
                n = sum(h.status == 429 for h in self.history)
                delay = min(0.5 * 2 ** (n - 1), 8.0) * random.uniform(0.5, 1.5)
            delay = min(delay, MAX_RETRY_AFTER_S)
        pause(self.get_backoff_time() if delay is None else delay)
        if self.budget is not None:
            take_grant(self.budget, _stats())


# Connections that sent a request from a stoppable thread, with that thread's stop signal: a
# stop shuts their sockets (see abort_requests). A connection stays listed while it idles in the
# pool (shutting an idle socket on a stop is harmless) until its next request replaces the entry.
_SENT_BY: weakref.WeakKeyDictionary[HTTPConnection, threading.Event] = weakref.WeakKeyDictionary()
_SENT_BY_LOCK = threading.Lock()


class _ReportsSend:
    """Stamps this thread's budget grant once the request bytes are written (see budget.mark_sent).

    This is the latest point before the server can see the request and the earliest after which
    it may: stamping here rather than before the send keeps grant-to-wire delays out of the window.
    It also lists the connection under the thread's stop signal, if it has one.
    """

    def request(self, *args, **kw):  # type: ignore[no-untyped-def]
        stop = current_stop()
        with _SENT_BY_LOCK:
            if stop is None:
                _SENT_BY.pop(self, None)  # type: ignore[call-overload]
            else:
                _SENT_BY[self] = stop  # type: ignore[index]
        try:
            return super().request(*args, **kw)  # type: ignore[misc]
        finally:
            mark_sent()


def abort_requests(stop: threading.Event) -> int:
    """Shut the sockets of the requests sent under ``stop``: a response being waited for or read
    ends at once with a connection error (retried, so the retry's stop check ends the range)
    instead of holding the worker, and with it the process's exit, for a slow page or a server
    that never answers (up to the read timeout). Returns the sockets shut."""
    with _SENT_BY_LOCK:
        conns = [c for c, s in _SENT_BY.items() if s is stop]
    shut = 0
    for conn in conns:
        sock = getattr(conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                shut += 1
    return shut


class _SentHTTPConnection(_ReportsSend, HTTPConnection):
    pass


class _SentHTTPSConnection(_ReportsSend, HTTPSConnection):
    pass


class _SentHTTPPool(HTTPConnectionPool):
    ConnectionCls = _SentHTTPConnection


class _SentHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _SentHTTPSConnection


class SentAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections report to the budget when a request has been sent."""

    def init_poolmanager(self, *args, **kw):  # type: ignore[no-untyped-def, override]
        super().init_poolmanager(*args, **kw)
        self.poolmanager.pool_classes_by_scheme = {"http": _SentHTTPPool, "https": _SentHTTPSPool}
