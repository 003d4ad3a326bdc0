"""The Polygon/Massive v3 HTTP client: one pooled ``requests`` session, one retry policy.

Every HTTP request (first tries, pages and retries alike) first takes a grant from the shared
request budget, and is sent with the key as a Bearer header. 401/403 stop at once.

Retries. ``BudgetedRetry`` (a urllib3 ``Retry``) is the retry policy: it retries resets,
refused connections, timeouts (a server that never answers ends at the read timeout), 5xx (a
proxy's HTML error pages included, which are never parsed) and 429s; before every retry it
sleeps (``Retry-After`` if sent, else its backoff; stoppable), takes a budget grant and counts
the cause. A 429 also cuts the shared (AIMD) rate and shares its ``Retry-After`` with every
process on the budget, and has its own allowance (``MAX_THROTTLED``), so a long throttle does
not use up the allowance for failures.

One small loop remains in :meth:`PolygonClient.get_page`, for what goes wrong *after* a 200's
headers: a body cut short, one that stalls longer than the read timeout, one that does not
decode, or a page that is not valid JSON. urllib3's ``Retry`` cannot see these: ``requests``
always asks urllib3 for an unread body (``preload_content=False``), and a 200's body is decoded
as it streams in (``pages.parse_stream``: a big page is never held whole, and the byte budget,
``_ByteBudget``, counts what is held); a page that is not a valid page can only be judged by the
decoder. The loop retries those with a grant per attempt, up to ``MAX_BODY_ATTEMPTS``; a page
whose pieces did not decode is read whole on the next attempt. (A client on urllib3 alone that
preloads bodies would move cut and stalled bodies into ``Retry``, but would hold every body
whole, and invalid pages would still need this loop.)

Each response's seconds (sent to decoded) teach ``timing`` (``cost.TransferModel``), which the
planner asks how big a merged range may be (decision record D18).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from urllib.parse import quote, urlsplit, urlunsplit

import polars as pl
import requests
from requests.auth import AuthBase
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError

from smallcaps_ingest.core.cost import TransferModel
from smallcaps_ingest.core.polygon.budget import BudgetBase, pause
from smallcaps_ingest.core.polygon.pages import PIECE_BYTES, PageDecodeError, parse_page, parse_stream
from smallcaps_ingest.core.polygon.stats import FetchStats
from smallcaps_ingest.core.polygon.transport import (
    MAX_THROTTLED,
    BudgetedRetry,
    SentAdapter,
    cause_of,
    current,
    is_html,
    take_grant,
)

PAGE_LIMIT = 50_000
# Response bytes held at once by all workers of a client (see _ByteBudget), at least; more
# workers than it streams side by side get their streamed share each (``body_budget``).
BODY_BYTES_IN_FLIGHT = 12 * 1024 * 1024
# What a body decoded as it streams in holds at once (a piece, the chunk after it): the share of
# BODY_BYTES_IN_FLIGHT it takes, so two dozen big pages arrive side by side (decision record D18).
STREAMED_BODY_BYTES = 2 * PIECE_BYTES
MAX_BODY_ATTEMPTS = 12  # attempts at a page whose body fails after the headers (see the docstring)


class PolygonError(RuntimeError):
    """A request that cannot succeed by retrying (after retries were exhausted, or 4xx)."""


class PolygonAuthError(PolygonError):
    """401/403: wrong key or a plan without the entitlement; never retried."""


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


class _BodyFault(Exception):
    """A 200 whose body failed after the headers (see the module docstring); ``cause`` as counted
    in the figures. ``backoff``: wait before the next attempt (not after a body that arrived)."""

    def __init__(self, cause: str, backoff: bool = True):
        super().__init__(cause)
        self.cause = cause
        self.backoff = backoff


class _ByteBudget:
    """Bounds the response bytes held at once, across worker threads.

    A 50k-row page is ~12 MB of JSON; a dozen of those held whole at once would be most of a
    run's peak RSS. 200 bodies are decoded as they stream in and hold a piece at a time
    (``STREAMED_BODY_BYTES``); a body read whole (an error's, or a page whose streamed decoding
    failed) takes its length. Holding whole bodies made big pages arrive one after another while
    the budget idled (D18). A body larger than the whole budget takes all of it.
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


def body_budget(workers: int) -> int:
    """The default bound on response bytes held: ``BODY_BYTES_IN_FLIGHT``, or every worker's
    streamed share when that is more, so no worker waits for another's body to end (D18)."""
    return max(BODY_BYTES_IN_FLIGHT, max(1, workers) * STREAMED_BODY_BYTES)


def _read_body(resp: requests.Response) -> bytes:
    """A streamed response's whole body in one read; failures after the headers are ``_BodyFault``.

    ``Response.content`` reads 10 KiB at a time through three layers of Python, holding the GIL
    for each: ~1,000 iterations for a 10 MB page. One ``read`` of the urllib3 response loops in C
    (the socket reads release the GIL). Other statuses keep ``content`` (their text is shown)."""
    try:
        if resp.status_code != 200:
            return resp.content
        body = resp.raw.read(decode_content=True)
    except (ProtocolError, DecodeError, requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError):  # a short body (IncompleteRead), a reset
        raise _BodyFault("truncated") from None
    except (ReadTimeoutError, requests.exceptions.ConnectionError):  # the body stopped arriving
        raise _BodyFault("read_timeout") from None
    except SSLError as e:
        raise requests.exceptions.SSLError(e) from None
    resp._content = body  # so .text / .json() still work on it
    resp._content_consumed = True
    return body


def _chunks(resp: requests.Response) -> Iterator[bytes]:
    """A 200's body as it arrives, in reads of ``PIECE_BYTES`` (each loops in C, releasing the GIL
    on the socket); failures after the headers are ``_BodyFault`` as in ``_read_body``."""
    try:
        yield from resp.raw.stream(PIECE_BYTES, decode_content=True)
    except (ProtocolError, DecodeError, requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError):
        raise _BodyFault("truncated") from None
    except (ReadTimeoutError, requests.exceptions.ConnectionError):
        raise _BodyFault("read_timeout") from None
    except SSLError as e:
        raise requests.exceptions.SSLError(e) from None


def _declared_length(resp: requests.Response) -> int:
    try:
        return max(0, int(resp.headers.get("Content-Length") or 0))
    except ValueError:
        return 0


def _inside(windows: Sequence[tuple[int, int]]) -> pl.Expr:
    ts = pl.col("sip_timestamp")
    expr = pl.lit(False)
    for lo, hi in windows:
        expr = expr | ((ts >= lo) & (ts < hi))
    return expr


class PolygonClient:
    """A pooled, budgeted v3 client. Safe to share between worker threads.

    ``source`` names the API behind ``base_url`` ("polygon", or "simulator" for the bundled
    simulator); the store records it in the tree so one tree never mixes the two."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        budget: BudgetBase,
        *,
        source: str = "polygon",
        workers: int = 12,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_retries: int = 8,
        body_bytes_in_flight: int | None = None,
        timing: TransferModel | None = None,
    ):
        if not api_key:
            raise PolygonAuthError("no Polygon API key: set POLYGON_API_KEY (or POLYGON_BASE_URL=simulator)")
        self.base_url = base_url.rstrip("/")
        self._base = urlsplit(self.base_url)
        self._key = api_key
        self.budget = budget
        self.source = source
        self.timeout = (connect_timeout, read_timeout)
        self.max_retries = max_retries
        bound = body_budget(workers) if body_bytes_in_flight is None else body_bytes_in_flight
        self._bodies = _ByteBudget(bound)
        #: seconds per response as observed (the planner's cost of a merged range's pages)
        self.timing = timing if timing is not None else TransferModel()
        retry = BudgetedRetry(
            total=max_retries,
            connect=max_retries,
            read=max_retries,
            status=max_retries,
            other=max_retries,
            backoff_factor=0.2,
            backoff_max=8.0,
            backoff_jitter=0.2,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
            respect_retry_after_header=True,
            budget=budget,
        )
        self.session = requests.Session()
        adapter = SentAdapter(pool_connections=4, pool_maxsize=max(workers, 1) + 4, max_retries=retry)
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
        """One page, retried until it is a complete, valid 200 body (see the module docstring)."""
        current.stats = stats
        current.endpoint = kind
        whole = False
        try:
            for attempt in range(MAX_BODY_ATTEMPTS):
                take_grant(self.budget, stats)
                try:
                    return self._attempt(kind, url, params, stats, nbbo_only, whole)
                except _BodyFault as fault:
                    last = fault.cause
                    whole = whole or not fault.backoff  # a page that did not decode in pieces
                    stats.count("retries", last)
                    if fault.backoff and attempt + 1 < MAX_BODY_ATTEMPTS:
                        pause(0.5 * random.uniform(0.5, 1.0))
            stats.count("errors", "gave_up")
            what = {"truncated": "truncated or invalid bodies",
                    "read_timeout": f"bodies that stalled longer than the {self.timeout[1]:g} s read timeout"}
            raise PolygonError(
                f"{kind} request still failing after {MAX_BODY_ATTEMPTS} attempts (the last: {what[last]})"
            )
        finally:
            current.stats = None

    def _attempt(
        self,
        kind: str,
        url: str,
        params: Mapping[str, object] | None,
        stats: FetchStats,
        nbbo_only: bool,
        whole: bool = False,
    ) -> tuple[pl.DataFrame, str | None]:
        """One request (urllib3 retries what fails before the body), its body read and decoded:
        a 200's as it streams in unless ``whole``; the seconds it took teach ``timing``."""
        t0 = time.monotonic()
        try:
            resp = self.session.get(url, params=params, timeout=self.timeout, stream=True)
            streamed = resp.status_code == 200 and not whole
            size = _declared_length(resp)
            held = self._bodies.take(min(size, STREAMED_BODY_BYTES) if streamed else size)
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as e:
            cause, message = self._failure(kind, e)
            stats.count("errors", cause)
            raise PolygonError(message) from None
        try:
            if streamed:
                try:
                    frame, next_url, nbytes = parse_stream(kind, _chunks(resp), nbbo_only)
                except PageDecodeError:
                    raise _BodyFault("truncated", backoff=False) from None
            else:
                frame, next_url, nbytes = self._read_whole(kind, resp, nbbo_only, stats)
        except requests.exceptions.SSLError as e:
            cause, message = self._failure(kind, e)
            stats.count("errors", cause)
            raise PolygonError(message) from None
        finally:
            self._bodies.give(held)
        stats.add(bytes=nbytes, pages=1, rows_raw=frame.height)
        retries = getattr(resp.raw, "retries", None)
        if not getattr(retries, "history", ()):  # a retried request's seconds hold its backoff
            self.timing.observe(kind, frame.height, nbytes, time.monotonic() - t0)
        return frame, next_url

    def _read_whole(
        self, kind: str, resp: requests.Response, nbbo_only: bool, stats: FetchStats
    ) -> tuple[pl.DataFrame, str | None, int]:
        """A body read whole, then decoded (a non-200 raises its error)."""
        body = _read_body(resp)
        if resp.status_code != 200:
            self._refuse(kind, resp, body, stats)
        try:
            frame, next_url = parse_page(kind, body, nbbo_only)
        except PageDecodeError:
            raise _BodyFault("truncated", backoff=False) from None
        return frame, next_url, len(body)

    def _refuse(self, kind: str, resp: requests.Response, body: bytes, stats: FetchStats) -> None:
        """Raise the error of an answer that retrying did not (or cannot) turn into a 200."""
        status = resp.status_code
        if status == 429:
            stats.count("errors", "gave_up")
            raise PolygonError(
                f"{kind} request still failing after {MAX_THROTTLED} attempts (the last: HTTP 429)"
            )
        if status >= 500 and is_html(resp.headers, body):
            stats.count("errors", "5xx_html")
            raise PolygonError(self._html_message(kind, resp, body))
        message = self._message(resp)
        if status in (401, 403):
            stats.count("errors", str(status))
            raise PolygonAuthError(self._auth_message(kind, status, message))
        stats.count("errors", "5xx" if status >= 500 else str(status))
        raise PolygonError(f"{kind} request answered HTTP {status}: {message}")

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
        cause = cause_of(reason if isinstance(reason, Exception) else None, None)
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
        and identical trades occur within a day). Pages follow ``next_url`` on the same host.
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
            stats.add(rows_inside=page.height)
            frames.append(page)
            url = self._same_host(next_url) if next_url else None
            params = None
        # Not sorted here: shaping sorts each event's slice, which is all that is ever written.
        return (pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]), raw
