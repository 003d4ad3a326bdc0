"""Fetch ticks from the Polygon/Massive v3 API: the HTTP client and the per-symbol fetch engine.

Every HTTP request (first tries, pages and retries alike) first takes a grant from the shared
request budget. Resets, timeouts (a server that never answers ends at the read timeout) and 5xx
(a proxy's HTML error pages included, which are never parsed) are retried by urllib3 ``Retry`` (a
subclass that takes a grant before each retry and counts the cause); 429s, truncated and invalid
bodies and bodies that stall mid-way are retried here, because they need the AIMD budget or a
re-read of the body. 401/403 stop at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import random
import re
import socket
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import polars as pl
import pyarrow as pa
import pyarrow.json as pa_json
import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util.retry import Retry

from smallcaps_ingest.core import shape, store
from smallcaps_ingest.core.plan import (
    DensityStore,
    RequestRange,
    Window,
    overfetch_allowance,
    plan_groups,
)
from smallcaps_ingest.core.polygon.budget import (
    BudgetBase,
    StopRequested,
    current_stop,
    mark_sent,
    pause,
    stoppable,
)

log = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://api.polygon.io"
# Seconds a worker spends per request (round trip + parse), for sizing the pool (Little's law).
REQUEST_SECONDS = 0.4
MAX_DEFAULT_WORKERS = 32
PAGE_LIMIT = 50_000
SIMULATOR_HEADER = "X-Smallcaps-Simulator"
# Response bytes read and decoded at once by all workers of a client (see _ByteBudget).
BODY_BYTES_IN_FLIGHT = 12 * 1024 * 1024
# New jobs wait while fetched-but-unwritten rows exceed this (with at most 2x workers ranges).
FRAME_BYTES_HELD = 24 * 1024 * 1024
_END = object()
MAX_ATTEMPTS = 12  # our own retries (429, truncated/invalid bodies); urllib3 retries come on top


# ----------------------------------------------------------------------------------------------
# Errors and figures
# ----------------------------------------------------------------------------------------------
def default_workers(max_rps: float) -> int:
    """Workers that keep ``max_rps`` busy: requests in flight = rate x seconds per request, never
    fewer than the 12 users run today and at most 32 (each worker adds ~1.3 MB of peak RSS:
    262 MB at 20, 310 MB at 40). 0.4 s, not the 0.2 of a small page at 100 ms latency, because
    multi-day ranges return larger pages that a server takes longer to produce: at 50 req/s on
    the multi-day manifest 12 workers kept 0.91-0.94 of the budget busy, 20 kept 0.98
    (benchmarks/throughput.py). 50 req/s: 20 workers; 80 req/s and above: 32."""
    return min(MAX_DEFAULT_WORKERS, max(12, math.ceil(max_rps * REQUEST_SECONDS)))


class PolygonError(RuntimeError):
    """A request that cannot succeed by retrying (after retries were exhausted, or 4xx)."""


class PolygonAuthError(PolygonError):
    """401/403: wrong key or a plan without the entitlement; never retried."""


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
            "budget_wait_s": round(self.budget_wait_s, 3),
            "errors_by_type": self.error_counts(),
        }


_current = threading.local()  # the FetchStats of the request running in this thread


def _stats() -> FetchStats | None:
    return getattr(_current, "stats", None)


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------
def _is_html(headers: Mapping[str, str], body: bytes = b"") -> bool:
    """A proxy's or CDN's error page (nginx, Cloudflare...), not an answer of the API (JSON)."""
    return "html" in (headers.get("Content-Type") or "").lower() or body.lstrip()[:1] == b"<"


def _cause(error: Exception | None, response: object | None) -> str:
    """Why a request is retried or failed, as counted in the figures: ``429``, ``5xx``,
    ``5xx_html`` (a 5xx whose body is an HTML page: a proxy in front of the API), another status,
    ``connect`` (refused), ``connect_timeout``, ``read_timeout`` (no answer within the read
    timeout: a hung server, or one that stalls mid-body), ``reset``."""
    if response is not None and getattr(response, "status", None):
        status = int(response.status)  # type: ignore[attr-defined]
        if status >= 500:
            return "5xx_html" if _is_html(response.headers) else "5xx"  # type: ignore[attr-defined]
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
    """urllib3 Retry that takes a budget grant before every retry and counts why it retried."""

    budget: BudgetBase | None = None

    def new(self, **kw: object) -> BudgetedRetry:  # type: ignore[override]
        retry = super().new(**kw)  # type: ignore[arg-type]
        retry.budget = self.budget  # type: ignore[attr-defined]
        return retry  # type: ignore[return-value]

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        # 429 is ours: it must lower the shared (AIMD) rate, which urllib3 knows nothing about.
        return status_code != 429 and super().is_retry(method, status_code, has_retry_after)

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):  # type: ignore[no-untyped-def]  # noqa: E501
        # counted once it is a retry: the last attempt's failure (MaxRetryError) is the caller's error
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        stats = _stats()
        if stats is not None:
            stats.count("retries", _cause(error, response))
        return retry

    def sleep(self, response=None) -> None:  # type: ignore[no-untyped-def]
        # urllib3's own sleep, made stoppable: Retry-After if the server sent one, else the backoff
        retry_after = self.get_retry_after(response) if self.respect_retry_after_header and response else None
        pause(retry_after or self.get_backoff_time())
        if self.budget is not None:
            waited = self.budget.acquire()
            stats = _stats()
            if stats is not None:
                stats.add(budget_wait_s=waited)
                stats.count("requests", getattr(_current, "endpoint", "other"))


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


class BudgetedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections report to the budget when a request has been sent."""

    def __init__(self, budget: BudgetBase, **kw: object):
        self.budget = budget
        super().__init__(**kw)  # type: ignore[arg-type]

    def init_poolmanager(self, *args, **kw):  # type: ignore[no-untyped-def, override]
        super().init_poolmanager(*args, **kw)
        self.poolmanager.pool_classes_by_scheme = {"http": _SentHTTPPool, "https": _SentHTTPSPool}


# The quote fields the 1 Hz grid keeps: at SMALLCAPS_QUOTES_HZ > 0 the others are not decoded.
NBBO_SCHEMA: dict[str, pl.DataType] = {
    k: shape.RAW_QUOTES_SCHEMA[k]
    for k in ("sip_timestamp", "sequence_number", "bid_price", "ask_price", "bid_size", "ask_size",
              "bid_exchange", "ask_exchange")
}


class PageDecodeError(ValueError):
    """A 200 body that is not a complete, valid v3 page (truncated or garbled); retried."""


class _BodyTimeout(Exception):
    """A body that stopped arriving for longer than the read timeout (the server stalled
    mid-body); retried by ``get_page`` like a truncated body."""


# polars parses a page in pieces of about this many bytes, cut between rows (see parse_page).
PIECE_BYTES = 256 << 10
_RESULTS = b'"results":['
_ROW_GAP = b"},{"
_ROWS_END = b"}]"
# Arrow's default jemalloc pool keeps freed pages for reuse: page frames are short-lived and
# sized all over the place, so that was ~170 MB of a 12-worker run's peak RSS (benchmarks).
_POOL = pa.system_memory_pool()
_ARROW = {pl.Int64(): pa.int64(), pl.Int32(): pa.int32(), pl.Float64(): pa.float64(),
          pl.String(): pa.string(), pl.List(pl.Int32()): pa.list_(pa.int32())}


@dataclass(frozen=True)
class _PageSchema:
    columns: dict[str, pl.DataType]
    polars: dict[str, pl.DataType]
    arrow: pa.Schema

    @classmethod
    def of(cls, columns: dict[str, pl.DataType]) -> _PageSchema:
        row = pa.struct([pa.field(name, _ARROW[dtype]) for name, dtype in columns.items()])
        return cls(columns, {"results": pl.List(pl.Struct(columns)), "next_url": pl.String()},
                   pa.schema([("results", pa.list_(row)), ("next_url", pa.string())]))


_PAGE_SCHEMAS = {
    "trades": _PageSchema.of(shape.RAW_TRADES_SCHEMA),
    "quotes": _PageSchema.of(shape.RAW_QUOTES_SCHEMA),
    "nbbo": _PageSchema.of(NBBO_SCHEMA),
}


def _read_polars(body: bytes, schema: _PageSchema) -> tuple[pl.DataFrame | None, str | None]:
    page = pl.read_json(body, schema=schema.polars)
    if page.height != 1:
        raise PageDecodeError("not one JSON object")
    results = page.get_column("results")
    if results.null_count() or not results.list.len().item():
        return None, page.item(0, "next_url")
    return results.explode(empty_as_null=False).struct.unnest(), page.item(0, "next_url")


def _read_pieces(body: bytes, schema: _PageSchema) -> tuple[pl.DataFrame | None, str | None]:
    """polars' reader on the rows alone, in pieces of about ``PIECE_BYTES``, so its peak memory
    stays small and the rows never go through a one-row frame of a list of structs.

    The rows run from ``"results":[`` to the last ``}]`` of the page. Each piece ends at a ``},{``
    between two rows and is read as a JSON array; what is left of the page (its object with an
    empty ``results``) is read on its own, so ``next_url`` is found wherever it sits. A cut that is
    not between two top-level rows (inside a string, or inside a nested object), or a ``}]`` that
    does not close the rows, leaves a piece with an open string or bracket or with text after its
    closing bracket, which is invalid JSON: the reader raises and ``parse_page`` reads the page
    whole with pyarrow instead. A piece is never silently wrong.
    """
    start = body.find(_RESULTS) + len(_RESULTS)
    end = body.rfind(_ROWS_END) + 1  # just after the last row's closing brace
    if start < len(_RESULTS) or end <= start:
        return _read_polars(body, schema)  # no rows (or no array of them): the whole object
    view = memoryview(body)
    frames: list[pl.DataFrame] = []
    at = start
    while end - at > PIECE_BYTES and (cut := body.find(_ROW_GAP, at + PIECE_BYTES, end)) >= 0:
        frames.append(pl.read_json(b"".join((b"[", view[at : cut + 1], b"]")), schema=schema.columns))
        at = cut + 2
    frames.append(pl.read_json(b"".join((b"[", view[at:end], b"]")), schema=schema.columns))
    return (pl.concat(frames) if len(frames) > 1 else frames[0]), _next_url(view[:start], view[end:])


def _next_url(head: memoryview, tail: memoryview) -> str | None:
    """``next_url`` of the page without its rows (a few hundred bytes: stdlib json is cheapest)."""
    try:
        page = json.loads(b"".join((head, tail)))
    except ValueError:
        raise PageDecodeError("invalid JSON around the rows") from None
    if not isinstance(page, dict) or page.get("results") != []:
        raise PageDecodeError("not one JSON object")
    next_url = page.get("next_url")
    if next_url is not None and not isinstance(next_url, str):
        raise PageDecodeError(f"next_url is not a string: {str(next_url)[:80]!r}")
    return next_url


def _read_arrow(body: bytes, schema: _PageSchema) -> tuple[pl.DataFrame | None, str | None]:
    page = pa_json.read_json(
        pa.py_buffer(body),
        # one block holds the whole object (a JSON object may not straddle blocks)
        read_options=pa_json.ReadOptions(use_threads=False, block_size=len(body) + 64),
        parse_options=pa_json.ParseOptions(explicit_schema=schema.arrow, unexpected_field_behavior="ignore"),
        memory_pool=_POOL,
    )
    if page.num_rows != 1:
        raise PageDecodeError("not one JSON object")
    results = page.column("results").chunk(0)
    if results.null_count or not len(results[0]):
        return None, page.column("next_url")[0].as_py()
    # zero-copy: the rows stay in the system pool instead of being copied by polars' allocator
    frame = pl.from_arrow(pa.RecordBatch.from_struct_array(results.flatten()))
    return frame, page.column("next_url")[0].as_py()  # type: ignore[return-value]


def parse_page(kind: str, body: bytes, nbbo_only: bool = False) -> tuple[pl.DataFrame, str | None]:
    """Decode one v3 page into a typed frame.

    Both readers parse in native code without the GIL, so twelve workers parse on every core;
    msgspec structs (plus one Python list per column) held the GIL half the time at 100 req/s
    and capped it at one core. polars' reader takes the least CPU but peaks at ~8x its input in
    memory, which its allocator then keeps, so it reads a page's rows alone, in 256 KiB pieces cut
    between rows (``_read_pieces``): 0.47 ms per 1,000 quotes against 0.55-0.69 whole and 0.73
    for pyarrow's reader, which peaks at ~1.5x (benchmarks/cost_per_tick.py). Reading the rows as
    arrays, not the last piece as the page object, took 11 % less CPU on small-cap pages (a
    frame of one row holding a list of structs costs its explode). pyarrow reads the page whole
    when the pieces do not parse. Fields outside the schema are skipped; a missing ``results``
    is an empty page. ``nbbo_only`` decodes just the quote fields the sampled grid keeps. Raises
    ``PageDecodeError`` on truncated or invalid JSON, which the caller retries.
    """
    schema = _PAGE_SCHEMAS["nbbo" if kind == "quotes" and nbbo_only else kind]
    try:
        frame, next_url = _read_pieces(body, schema)
    except (pl.exceptions.PolarsError, PageDecodeError):
        try:
            frame, next_url = _read_arrow(body, schema)
        except (pa.ArrowInvalid, PageDecodeError) as e:
            raise PageDecodeError(f"invalid {kind} page ({len(body)} bytes): {str(e)[:160]}") from None
    if frame is None:
        return pl.DataFrame(schema=schema.columns), next_url
    if frame.get_column("sip_timestamp").null_count() or frame.get_column("sequence_number").null_count():
        # the v3 API always sends both; a row without them sorts first and falls outside every window
        frame = frame.with_columns(pl.col("sip_timestamp", "sequence_number").fill_null(0))
    return frame, next_url


class _BearerAuth(AuthBase):
    """Sends the key as ``Authorization: Bearer`` on every request, ``next_url`` pages included.

    It is the session's ``auth`` rather than a default header because requests, with no ``auth``
    set, looks the host up in ``~/.netrc`` (or ``$NETRC``) on every request, and an entry there
    would replace the header with Basic credentials: every request would then be refused."""

    def __init__(self, key: str):
        self._key = key

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._key}"
        return r

    def __repr__(self) -> str:  # never show the key
        return "_BearerAuth(<key hidden>)"


class PolygonClient:
    """A pooled, budgeted v3 client. Safe to share between worker threads."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        budget: BudgetBase,
        *,
        workers: int = 12,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_retries: int = 8,
        body_bytes_in_flight: int = BODY_BYTES_IN_FLIGHT,
    ):
        if not api_key:
            raise PolygonAuthError("no Polygon API key: set POLYGON_API_KEY (or POLYGON_BASE_URL=simulator)")
        self.base_url = base_url.rstrip("/")
        self._base = urlsplit(self.base_url)
        self._key = api_key
        self.budget = budget
        self.timeout = (connect_timeout, read_timeout)
        self.max_retries = max_retries
        self._bodies = _ByteBudget(body_bytes_in_flight)
        self.source: str | None = None  # "simulator" or "polygon", known after the first answer
        retry = BudgetedRetry(
            total=max_retries,
            connect=max_retries,
            read=max_retries,
            status=max_retries,
            other=max_retries,
            backoff_factor=0.2,
            backoff_max=8.0,
            backoff_jitter=0.2,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
            respect_retry_after_header=True,
        )
        retry.budget = budget
        self.session = requests.Session()
        adapter = BudgetedAdapter(
            budget, pool_connections=4, pool_maxsize=max(workers, 1) + 4, max_retries=retry
        )
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.auth = _BearerAuth(api_key)
        self.session.headers.update({"Accept": "application/json", "User-Agent": "smallcaps-ingest/0.1"})

    def __repr__(self) -> str:  # never show the key
        return f"PolygonClient(base_url={self.base_url!r})"

    def close(self) -> None:
        self.session.close()

    def _same_host(self, url: str) -> str:
        """Follow next_url on the configured host: the key only ever goes where it was meant to."""
        parts = urlsplit(url)
        return urlunsplit((self._base.scheme, self._base.netloc, parts.path, parts.query, ""))

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def get_page(
        self,
        kind: str,
        url: str,
        params: Mapping[str, object] | None,
        stats: FetchStats,
        nbbo_only: bool = False,
    ) -> tuple[pl.DataFrame, str | None]:
        """One page, retried until it is a complete, valid 200 body."""
        _current.stats = stats
        _current.endpoint = kind
        backoff = 0.5
        last = "429"  # why the latest attempt is retried
        try:
            for _attempt in range(MAX_ATTEMPTS):
                stats.add(budget_wait_s=self.budget.acquire())
                stats.count("requests", kind)
                held = 0  # body bytes taken from the byte budget, given back in every path
                try:
                    try:
                        resp = self.session.get(url, params=params, timeout=self.timeout, stream=True)
                        held = self._bodies.take(_declared_length(resp))
                        body = _read_body(resp)
                    except (
                        requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ContentDecodingError,
                        _BodyTimeout,
                    ) as e:
                        last = "read_timeout" if isinstance(e, _BodyTimeout) else "truncated"
                        stats.count("retries", last)
                        pause(min(backoff, 2.0) * random.uniform(0.5, 1.0))
                        continue
                    except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as e:
                        cause, message = self._failure(kind, e)
                        stats.count("errors", cause)
                        raise PolygonError(message) from None
                    status = resp.status_code
                    if self.source is None and status == 200:  # not a proxy's error page
                        self.source = "simulator" if resp.headers.get(SIMULATOR_HEADER) else "polygon"
                    if status == 200:
                        stats.add(bytes=len(body))
                        try:
                            frame, next_url = parse_page(kind, body, nbbo_only)
                        except PageDecodeError:
                            last = "truncated"
                            stats.count("retries", last)
                            continue
                        finally:
                            del body
                            self._bodies.give(held)
                            held = 0
                        stats.add(pages=1, rows_raw=frame.height)
                        return frame, next_url
                    self._bodies.give(held)  # not kept while a 429 backs off
                    held = 0
                    if status == 429:
                        last = "429"
                        stats.add(throttled=1)
                        retry_after = resp.headers.get("Retry-After")
                        try:
                            delay = float(retry_after) if retry_after else backoff * random.uniform(0.5, 1.5)
                        except ValueError:
                            delay = backoff
                        # the cut and the Retry-After are shared: every process on the budget waits
                        self.budget.on_throttled(delay if retry_after else None)
                        backoff = min(backoff * 2, 8.0)
                        pause(min(delay, 30.0))
                        continue
                    if status >= 500 and _is_html(resp.headers, body):
                        stats.count("errors", "5xx_html")
                        raise PolygonError(self._html_message(kind, resp, body))
                    message = self._message(resp)
                    if status in (401, 403):
                        stats.count("errors", str(status))
                        raise PolygonAuthError(self._auth_message(kind, status, message))
                    stats.count("errors", "5xx" if status >= 500 else str(status))
                    raise PolygonError(f"{kind} request answered HTTP {status}: {message}")
                finally:
                    self._bodies.give(held)
            stats.count("errors", "gave_up")
            what = {"429": "HTTP 429", "truncated": "truncated or invalid bodies",
                    "read_timeout": f"bodies that stalled longer than the {self.timeout[1]:g} s read timeout"}
            raise PolygonError(
                f"{kind} request still failing after {MAX_ATTEMPTS} attempts (the last: {what[last]})"
            )
        finally:
            _current.stats = None

    def _failure(self, kind: str, e: requests.exceptions.RequestException) -> tuple[str, str]:
        """The cause and a clear message of a request that failed after urllib3's retries."""
        reason = getattr(e.args[0], "reason", e.args[0]) if e.args else None
        tries = f"{self.max_retries + 1} attempts"
        if isinstance(reason, ReadTimeoutError) or isinstance(e, requests.exceptions.ReadTimeout):
            return "read_timeout", (
                f"{kind} request got no answer within the {self.timeout[1]:g} s read timeout, {tries} "
                "(the server, or a proxy in front of it, accepted the request and never answered)"
            )
        if isinstance(e, requests.exceptions.ConnectTimeout):
            return "connect_timeout", f"{kind} request did not connect within {self.timeout[0]:g} s, {tries}"
        cause = _cause(reason if isinstance(reason, Exception) else None, None)
        cause = "reset" if cause not in ("connect", "reset") else cause
        return cause, f"{kind} request failed after {tries} (connection): {self._scrub(str(e))}"

    def _html_message(self, kind: str, resp: requests.Response, body: bytes) -> str:
        """An HTML 5xx page is never parsed as data: name the status and say what came back."""
        title = re.search(rb"<title>\s*(.*?)\s*</title>", body[:4096], re.IGNORECASE | re.DOTALL)
        shown = f" titled {self._scrub(title.group(1)[:80].decode('utf-8', 'replace'))!r}" if title else ""
        return (
            f"{kind} request answered HTTP {resp.status_code} ({resp.reason}) with an HTML page{shown}, "
            f"not the API's JSON: a proxy or CDN in front of the API failed. Still failing after "
            f"{self.max_retries + 1} attempts; retry later."
        )

    def _message(self, resp: requests.Response) -> str:
        try:
            body = resp.json()
            text = body.get("message") or body.get("error") or resp.text[:200]
        except ValueError:
            text = resp.text[:200]
        return self._scrub(str(text))

    @staticmethod
    def _auth_message(kind: str, status: int, message: str) -> str:
        if status == 401:
            return (
                f"Polygon rejected the API key (HTTP 401: {message}). Check POLYGON_API_KEY; "
                "the key itself is never logged."
            )
        plan = "Stocks Advanced (quotes)" if kind == "quotes" else "Stocks Developer (trades)"
        return (
            f"Polygon refused {kind} (HTTP 403: {message}). Your plan lacks the {kind} entitlement: "
            f"{kind} need at least {plan}."
        )

    def fetch_range(
        self, kind: str, ticker: str, start_ns: int, end_ns: int, stats: FetchStats, nbbo_only: bool = False
    ) -> pl.DataFrame:
        """Every tick in [start_ns, end_ns), ascending, across all pages: every row the API returned.

        ``nbbo_only`` (quotes only) keeps just the fields the sampled quote grid needs.
        """
        frame = self.fetch_windows(kind, ticker, start_ns, end_ns, stats, nbbo_only)[0]
        return frame.sort("sip_timestamp", "sequence_number")

    def fetch_windows(
        self,
        kind: str,
        ticker: str,
        start_ns: int,
        end_ns: int,
        stats: FetchStats,
        nbbo_only: bool = False,
        keep: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[pl.DataFrame, int]:
        """As ``fetch_range`` (unsorted), keeping only ticks inside ``keep``; also the raw row count.

        A merged range spans the gaps between its events (up to the over-fetch bound); dropping
        the gap rows page by page keeps a dense symbol's day from being held in memory whole.
        Nothing else is dropped, not even at page seams: the cursor is exact, and
        ``sequence_number`` is no row key (it restarts every trading day, and genuine duplicates
        and identical trades occur within a day).
        """
        url: str | None = f"{self.base_url}/v3/{kind}/{quote(ticker, safe='.-')}"
        params: dict[str, object] | None = {
            "timestamp.gte": int(start_ns),
            "timestamp.lt": int(end_ns),
            "order": "asc",
            "sort": "timestamp",
            "limit": PAGE_LIMIT,
        }
        frames: list[pl.DataFrame] = []
        raw = 0
        while url:
            page, next_url = self.get_page(kind, url, params, stats, nbbo_only)
            raw += page.height
            if keep is not None and page.height:
                page = page.filter(_inside(keep))
            frames.append(page)
            url = self._same_host(next_url) if next_url else None
            params = None
        # Not sorted here: shaping sorts each event's slice, which is all that is ever written.
        return (pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]), raw


def _inside(windows: Sequence[tuple[int, int]]) -> pl.Expr:
    ts = pl.col("sip_timestamp")
    expr = pl.lit(False)
    for lo, hi in windows:
        expr = expr | ((ts >= lo) & (ts < hi))
    return expr


def _read_body(resp: requests.Response) -> bytes:
    """A streamed 200 response's whole body in one read, with requests' own error mapping.

    ``Response.content`` reads 10 KiB at a time through three layers of Python, holding the GIL
    for each: ~1,000 iterations for a 10 MB page. One ``read`` of the urllib3 response loops in C
    (the socket reads release the GIL). Other statuses keep ``content`` (their text is shown)."""
    if resp.status_code != 200:
        return resp.content
    try:
        body = resp.raw.read(decode_content=True)
    except ProtocolError as e:  # a short body (IncompleteRead) or a reset mid-body
        raise requests.exceptions.ChunkedEncodingError(e) from None
    except DecodeError as e:
        raise requests.exceptions.ContentDecodingError(e) from None
    except ReadTimeoutError:  # the body stopped arriving: retried by get_page
        raise _BodyTimeout from None
    except SSLError as e:
        raise requests.exceptions.SSLError(e) from None
    resp._content = body  # so .text / .json() still work on it
    resp._content_consumed = True
    return body


def _declared_length(resp: requests.Response) -> int:
    try:
        return max(0, int(resp.headers.get("Content-Length") or 0))
    except ValueError:
        return 0


class _ByteBudget:
    """Bounds the response bytes being read and decoded at once, across worker threads.

    A 50k-row page is ~10 MB of JSON and about as much again while it is decoded; twelve of those
    at once was most of a 12-worker run's peak RSS, and a 2-core host decodes two at a time
    anyway, so more than a few bodies at once buys nothing. A body larger than the whole budget
    takes all of it.
    """

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.used = 0
        self._cond = threading.Condition()

    def take(self, n: int) -> int:
        n = min(max(n, 1), self.limit)
        with self._cond:
            while self.used + n > self.limit:
                self._cond.wait()
            self.used += n
        return n

    def give(self, n: int) -> None:
        if n > 0:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


# ----------------------------------------------------------------------------------------------
# The engine: many symbols, one worker pool
# ----------------------------------------------------------------------------------------------
@dataclass
class SymbolOutcome:
    symbol: str
    events_total: int
    skipped: int  # already complete on disk before this run: no request made
    written: int = 0
    empty: int = 0  # written with zero trades and zero quotes
    files_bytes: int = 0  # parquet bytes written by this run
    stats: FetchStats = field(default_factory=FetchStats)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    begun: bool = False  # a request was planned (started is then when)
    error: BaseException | None = None

    @property
    def complete(self) -> int:
        return self.skipped + self.written

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def events_per_min(self) -> float:
        return self.written / (self.seconds / 60) if self.seconds > 0 and self.written else 0.0


@dataclass
class _Job:
    """Windows of one symbol that no planned range shares with any other job: fetched, shaped and
    written together (one day, or several days of a sparse name whose ranges cross days)."""

    symbol: str
    windows: list[Window]
    ranges: list[RequestRange] = field(default_factory=list)
    frames: dict[int, tuple[pl.DataFrame, int]] = field(default_factory=dict)  # kept rows, raw count
    remaining: int = 0
    held: int = 0  # bytes of fetched frames this job holds until it is written
    done: threading.Event = field(default_factory=threading.Event)  # written or failed


_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Make glibc hand freed memory back instead of keeping it per thread (Linux/glibc only).

    Page bodies and frames are megabytes each and short-lived, allocated on a dozen threads: by
    default glibc gives busy threads their own arenas and raises its mmap threshold after such
    frees, so they are recycled inside ever-growing heaps. Two arenas, a fixed mmap threshold and
    a 1 MiB trim threshold cut a 12-worker run's peak RSS by ~40 % at no measured throughput cost
    (benchmarks/cost_per_tick.py). The threshold is 1 MiB, not 256 KiB: zstd's compression
    contexts (one per Parquet column) fall under it and are recycled instead of mapped and
    unmapped each time, which cost ~15 % of the encoding CPU, at the same peak RSS.
    Process-wide, so done once, by the engine.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return _MALLOC_TUNED
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt knobs)
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (m_arena_max, 2),
            (m_mmap_threshold, 1024 * 1024),
            (m_trim_threshold, 1024 * 1024),
        )
    )
    _MALLOC_TUNED = ok
    return ok


class FetchEngine:
    """Fetch and write many symbols' events on one shared thread pool.

    Work is fed job by job (a group of windows no range shares with another group: see
    ``plan.components``), at most ``2 * workers`` ranges in flight, so memory stays bounded and
    the pool moves on to the next symbol instead of idling at the tail of a small one. A symbol is
    planned ``plan.PLAN_HORIZON`` windows at a time, when its next job is due, so later jobs are
    planned on the densities its earlier ones observed. ``on_symbol_done`` runs on the calling
    thread as each symbol finishes.

    ``overfetch_rows`` (None: :func:`plan.overfetch_allowance` of the budget's rate) lets a range
    fetch that many rows beyond what its windows need, which is what merges a sparse name's
    events across days.

    :meth:`stop` (from any thread) ends a run promptly: no further request, page or retry is
    sent, queued ranges are cancelled, jobs whose ranges were all fetched are still written (each
    event's two files atomically, or not at all), and every symbol not finished by then ends
    with a :class:`StopRequested` error. A stopped engine stays stopped.
    """

    def __init__(
        self,
        client: PolygonClient,
        data_dir: str,
        *,
        workers: int = 12,
        hz: float = 1.0,
        max_overfetch: float = 4.0,
        overfetch_rows: int | None = None,
        density: DensityStore | None = None,
    ):
        self.client = client
        self.data_dir = data_dir
        self.workers = max(1, workers)
        self.hz = hz
        self.max_overfetch = max_overfetch
        self.overfetch_rows = (
            overfetch_allowance(client.budget.max_rps) if overfetch_rows is None else max(0, overfetch_rows)
        )
        self.density = density or DensityStore(None)
        tune_malloc()
        self._source_checked = False
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Stop the run (see the class docstring); returns at once, ``run`` returns soon after.

        Requests in flight are cut (their sockets shut): a range's data is written only once all
        its pages arrived, so waiting for one more page buys nothing but delay."""
        self._stop.set()
        abort_requests(self._stop)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _fetch_range(self, symbol: str, rng: RequestRange, stats: FetchStats) -> tuple[pl.DataFrame, int]:
        """One range, every page of it; each page and retry first checks the stop signal."""
        with stoppable(self._stop):
            return self.client.fetch_windows(
                rng.kind,
                symbol,
                rng.start_ns,
                rng.end_ns,
                stats,
                self.hz > 0,
                [(w.start_ns, w.end_ns) for w in rng.events],
            )

    @staticmethod
    def _stopped_error(symbol: str) -> StopRequested:
        return StopRequested(
            f"{symbol}: stopped before it finished (SIGTERM or run termination); its complete events "
            "are on disk and a resume skips them"
        )

    def _check_source(self) -> None:
        with self._lock:
            if not self._source_checked:
                store.check_source(self.data_dir, self.client.source or "polygon")
                self._source_checked = True

    def run(
        self,
        work: Mapping[str, Sequence[Window]],
        on_symbol_done: Callable[[SymbolOutcome], None] | None = None,
    ) -> list[SymbolOutcome]:
        outcomes: dict[str, SymbolOutcome] = {}
        todos: dict[str, list[Window]] = {}
        for symbol, windows in work.items():
            done = store.scan_symbol(self.data_dir, symbol).complete
            todo = [w for w in windows if w.event_id not in done]
            outcomes[symbol] = SymbolOutcome(symbol, len(windows), skipped=len(windows) - len(todo))
            todos[symbol] = todo
        # jobs handed out and not yet written or failed, per symbol; a symbol is finished when all
        # its jobs were handed out (it leaves `feeding`) and none is left
        jobs_left: dict[str, int] = dict.fromkeys(work, 0)
        feeding: set[str] = {s for s, todo in todos.items() if todo}

        def feed() -> Iterator[_Job | str | None]:
            """Jobs symbol after symbol; the symbol's name once all its jobs were handed out; None
            when nothing can be handed out until a probe is written. A symbol whose generator
            yields a probe's ``done`` event is parked there, and the next symbol goes on; parked
            symbols resume, first come first, as soon as their probe is written."""
            parked: list[tuple[threading.Event, str, Iterator[_Job | threading.Event]]] = []
            upcoming = iter([s for s, todo in todos.items() if todo])
            while True:
                ready = next((p for p in parked if p[0].is_set()), None)
                if ready is not None:
                    parked.remove(ready)
                    _, symbol, jobs = ready
                else:
                    nxt = next(upcoming, None)
                    if nxt is None:
                        if not parked:
                            return
                        yield None
                        continue
                    symbol, jobs = nxt, self._jobs(nxt, todos[nxt], outcomes[nxt])
                for item in jobs:
                    if isinstance(item, threading.Event):
                        parked.append((item, symbol, jobs))
                        break
                    yield item
                else:
                    yield symbol  # every job of the symbol was handed out

        finished: list[str] = [s for s in work if s not in feeding]
        cond = threading.Condition()
        in_flight = 0
        held_bytes = 0  # fetched rows waiting for their job to be written
        fatal: list[BaseException] = []
        results: list[SymbolOutcome] = []

        def finish_symbol(symbol: str) -> None:
            outcomes[symbol].finished = time.monotonic()
            finished.append(symbol)

        def job_done(job: _Job, error: BaseException | None) -> None:
            outcome = outcomes[job.symbol]
            if error is None:
                try:
                    self._write_job(job, outcome)
                except BaseException as e:  # noqa: BLE001 - recorded on the symbol, run fails later
                    outcome.stats.count("errors", "write" if isinstance(e, OSError) else type(e).__name__)
                    error = e
            job.done.set()
            with cond:
                if error is not None and outcome.error is None:
                    outcome.error = error
                    if isinstance(error, (PolygonAuthError, store.SourceMismatchError)):
                        fatal.append(error)
                jobs_left[job.symbol] -= 1
                if jobs_left[job.symbol] == 0 and job.symbol not in feeding:
                    finish_symbol(job.symbol)
                cond.notify_all()

        def range_done(job: _Job, idx: int, fut: Future[tuple[pl.DataFrame, int]]) -> None:
            nonlocal in_flight, held_bytes
            error = self._stopped_error(job.symbol) if fut.cancelled() else fut.exception()
            with cond:
                in_flight -= 1
                if error is None and job.remaining > 0:
                    job.frames[idx] = fut.result()
                    size = job.frames[idx][0].estimated_size()
                    job.held += size
                    held_bytes += size
                job.remaining -= 1
                last = job.remaining == 0
                failed = error is not None and job.remaining >= 0
                if failed:
                    job.remaining = -(10**9)  # the job failed; later range results are dropped
                    job.frames.clear()
                    held_bytes -= job.held
                    job.held = 0
                cond.notify_all()
            if failed:
                job_done(job, error)
            elif last:
                with cond:
                    in_flight += 1  # a pending write holds its frames: count it against the bound
                writer.submit(write_job, job)

        def write_job(job: _Job) -> None:
            nonlocal in_flight, held_bytes
            try:
                job_done(job, None)
            finally:
                with cond:
                    in_flight -= 1
                    held_bytes -= job.held
                    cond.notify_all()

        # Shaping and writing run on their own small pool, so the fetch workers keep the request
        # budget busy (on the fetch workers, writes capped 12 workers at ~80 req/s: benchmarks).
        writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="writer")
        with writer, ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="polygon") as pool:
            pending = feed()
            exhausted = False
            while True:
                if self.stopping and not exhausted:
                    exhausted = True  # nothing more is handed out; queued ranges are cancelled
                    pool.shutdown(wait=False, cancel_futures=True)
                with cond:
                    while finished:
                        results.append(outcomes[finished.pop(0)])
                        if on_symbol_done:
                            cond.release()
                            try:
                                on_symbol_done(results[-1])
                            finally:
                                cond.acquire()
                    if (
                        (exhausted or fatal)
                        and in_flight == 0
                        and all(n <= 0 or outcomes[s].error or fatal for s, n in jobs_left.items())
                    ):
                        break
                    if exhausted or fatal or in_flight >= 2 * self.workers or held_bytes > FRAME_BYTES_HELD:
                        cond.wait(timeout=0.5)
                        continue
                job = next(pending, _END)
                if job is _END:
                    exhausted = True
                    continue
                if job is None:  # every symbol left waits for its probe
                    with cond:
                        cond.wait(timeout=0.05)
                    continue
                if isinstance(job, str):  # the symbol's last job was handed out
                    with cond:
                        feeding.discard(job)
                        if jobs_left[job] == 0:
                            finish_symbol(job)
                    continue
                outcome = outcomes[job.symbol]
                with cond:
                    jobs_left[job.symbol] += 1
                if not outcome.begun:  # the symbol's clock starts with its first request, not the run's
                    outcome.begun = True
                    outcome.started = time.monotonic()
                job.remaining = len(job.ranges)
                for idx, rng in enumerate(job.ranges):
                    with cond:
                        in_flight += 1
                    fut = pool.submit(self._fetch_range, job.symbol, rng, outcome.stats)
                    fut.add_done_callback(lambda f, j=job, i=idx: range_done(j, i, f))

        # symbols cut short by a fatal error or a stop
        for outcome in outcomes.values():
            if outcome not in results:
                if outcome.error is None:
                    outcome.error = fatal[0] if fatal else self._stopped_error(outcome.symbol)
                outcome.finished = outcome.finished or time.monotonic()
                results.append(outcome)
                if on_symbol_done:
                    on_symbol_done(outcome)
        self.density.save()
        return results

    def _jobs(
        self, symbol: str, todo: Sequence[Window], outcome: SymbolOutcome
    ) -> Iterator[_Job | threading.Event]:
        """The symbol's jobs in time order (``plan.plan_groups``); after a probe, its ``done``
        event, so the rest is planned on what the probe taught. Stops once the symbol has failed."""
        for windows, rngs, probe in plan_groups(
            symbol, todo, self.density, self.max_overfetch, overfetch_rows=self.overfetch_rows
        ):
            if outcome.error is not None:
                return
            job = _Job(symbol, windows, rngs)
            yield job
            if probe:
                yield job.done

    def _write_job(self, job: _Job, outcome: SymbolOutcome) -> None:
        """Split each range back out per event, shape, and write the event's two files."""
        by_event: dict[str, dict[str, pl.DataFrame]] = {}
        for idx, rng in enumerate(job.ranges):
            frame, raw = job.frames[idx]
            self.density.observe(job.symbol, rng.kind, rng.start_ns, rng.end_ns, raw)
            for w in rng.events:
                by_event.setdefault(w.event_id, {})[rng.kind] = frame
        job.frames.clear()
        self._check_source()
        for w in job.windows:
            raw = by_event[w.event_id]
            trades = shape.shape_trades(raw["trades"], w.start_ns, w.end_ns)
            quotes = shape.shape_quotes(raw["quotes"], w.start_ns, w.end_ns, self.hz)
            size = store.write_event(self.data_dir, job.symbol, w.event_id, trades, quotes)
            outcome.stats.add(rows_kept=trades.height + quotes.height)
            with self._lock:
                outcome.written += 1
                outcome.empty += int(trades.height == 0 and quotes.height == 0)
                outcome.files_bytes += size


def windows_from_frame(events: pl.DataFrame) -> list[Window]:
    """Manifest rows (event_id, ts_start, ts_end) -> windows in integer nanoseconds."""
    df = events.select(
        "event_id",
        pl.col("ts_start").dt.cast_time_unit("ns").dt.epoch("ns").alias("s"),
        pl.col("ts_end").dt.cast_time_unit("ns").dt.epoch("ns").alias("e"),
    )
    return [Window(e, s, t) for e, s, t in df.iter_rows()]


def merge_stats(outcomes: Iterable[SymbolOutcome]) -> FetchStats:
    total = FetchStats()
    for o in outcomes:
        total.merge(o.stats)
    return total
