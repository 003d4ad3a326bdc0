"""The simulator's HTTP server: a threaded loopback server, its request log and counters.

``Simulator`` binds 127.0.0.1 (or another loopback address, never anything else) on an ephemeral
port by default, answers with ``api.py`` over ``market.py``, injects ``faults.py``, and records
every request (``request_log``, ``counters``, ``max_in_window``) so tests can check what a client
really sent.

A request's arrival time is when its bytes reached the server, which is what a real server's
rate limiter counts, not when a Python handler thread next got to it (that lag grows while other
handlers build large bodies, and would let the limiter admit more than the limit in a second).
On Linux the kernel stamps each received segment (``SO_TIMESTAMPNS``); elsewhere, or when the
option cannot be set, the handler stamps the bytes when its read returns.

Pure stdlib + orjson on purpose: ``python -m smallcaps_ingest.simulator`` must start fast and must
not import Dagster.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import orjson

from smallcaps_ingest.simulator import api, faults
from smallcaps_ingest.simulator.config import SimConfig

#: The response header that marks an answer as the simulator's (a proxy's HTML page lacks it).
SIMULATOR_HEADER = "X-Smallcaps-Simulator"

_LINUX_SO_TIMESTAMPNS = 35 if sys.platform.startswith("linux") else None
#: The socket option that makes the kernel stamp received segments; None: stamp on read instead.
_SO_TIMESTAMPNS: int | None = getattr(socket, "SO_TIMESTAMPNS", _LINUX_SO_TIMESTAMPNS)
_CMSG_SPACE = socket.CMSG_SPACE(16) if hasattr(socket, "CMSG_SPACE") else 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _StampedSocketReader(io.RawIOBase):
    """The handler's raw input, noting when the latest bytes arrived (``stamp``, time.time() base).

    ``kernel``: recvmsg, so the kernel's receive stamp comes with the bytes. Otherwise the stamp is
    taken when the read returns: later than the kernel's by however long the thread took to read.
    """

    def __init__(self, sock: socket.socket, kernel: bool) -> None:
        self._sock = sock
        self._kernel = kernel
        self.stamp: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._kernel:
            n = self._sock.recv_into(b)
            if n:
                self.stamp = time.time()
            return n
        n, ancillary, _flags, _addr = self._sock.recvmsg_into([b], _CMSG_SPACE)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = struct.unpack_from("qq", data)
                self.stamp = sec + nsec / 1e9
        return n


def _kernel_stamps(sock: socket.socket) -> bool:
    """Turn on the kernel's receive stamps for ``sock``, if this platform has them."""
    if _SO_TIMESTAMPNS is None or not _CMSG_SPACE or not hasattr(sock, "recvmsg_into"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server
    _stamped: _StampedSocketReader

    def setup(self) -> None:
        super().setup()
        self._stamped = _StampedSocketReader(self.connection, _kernel_stamps(self.connection))
        self.rfile = io.BufferedReader(self._stamped, 65536)

    def handle_one_request(self) -> None:
        self._stamped.stamp = None  # a request already buffered (pipelined) has no own stamp
        super().handle_one_request()

    def arrival(self) -> float | None:
        """When this request's bytes reached the server (time.time() base), if known."""
        return self._stamped.stamp

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: per-request logging is slow and the path may carry apiKey."""

    def do_GET(self) -> None:
        self.server.sim._handle(self)

    def _not_found(self) -> None:
        self.close_connection = True  # we never read request bodies, so do not reuse the connection
        self.server.sim._handle(self, routable=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_found

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, 501) in the same JSON shape, then close."""
        self.close_connection = True
        body = orjson.dumps({"status": "ERROR", "request_id": os.urandom(16).hex(), "error": message or ""})
        with contextlib.suppress(OSError):
            _send(self, *_frame(code, body, None, None, True))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sim: Simulator, family: int) -> None:
        self.address_family = family
        self.sim = sim
        self.conns: set[socket.socket] = set()
        self.rst: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn); skip it, we are loopback only.
        socketserver.TCPServer.server_bind(self)
        if _SO_TIMESTAMPNS is not None:  # accepted sockets inherit it, so a first request is stamped
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.discard(request)
            rst = request in self.rst
            self.rst.discard(request)
        if rst:
            request.close()  # SO_LINGER 0 is set: close() sends RST, no FIN from shutdown()
        else:
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # client went away; normal under fault injection and pool churn
        traceback.print_exc(file=sys.stderr)

    def close_all(self) -> None:
        with self.conns_lock:
            conns = list(self.conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


def _frame(
    status: int,
    body: bytes,
    extra: list[str] | None,
    declared_len: int | None,
    close: bool,
    html: bool = False,
) -> tuple[bytes, bytes]:
    """(head, body) of a response; ``declared_len`` promises a Content-Length other than len(body)."""
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: text/html" if html else "Content-Type: application/json",
        f"Content-Length: {len(body) if declared_len is None else declared_len}",
    ]
    if not html:  # a proxy's page is not the API's (nor the simulator's) answer
        head.append(f"{SIMULATOR_HEADER}: 1")
    if extra:
        head.extend(extra)
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"), body


def _send(h: _Handler, head: bytes, body: bytes, rate: float | None = None) -> None:
    """Write a response; ``rate`` (bytes/s): the body at that rate (``faults.paced_write``)."""
    if rate and body:
        h.wfile.write(head)
        faults.paced_write(h.wfile.write, body, rate)
        return
    if len(body) < 65536:
        h.wfile.write(head + body)  # one segment for small responses
    else:
        h.wfile.write(head)
        h.wfile.write(body)


def max_in_window(times: list[float], seconds: float = 1.0) -> int:
    """Most of the sorted `times` inside any half-open window [t, t + seconds)."""
    best = j = 0
    for i in range(len(times)):
        while times[i] - times[j] >= seconds:
            j += 1
        best = max(best, i - j + 1)
    return best


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the server saw it (bounds are effective nanosecond bounds, None = unbounded)."""

    t: float
    endpoint: str
    ticker: str | None
    status: int
    gte_ns: int | None
    lt_ns: int | None
    cursor: bool
    rows: int
    had_api_key_in_query: bool
    truncated: bool = False
    handled: float = 0.0  # when a handler thread got to it (t is when its bytes arrived)
    hung: bool = False  # never answered (hang_rate) or stalled mid-body (stall_rate)
    html: bool = False  # a proxy's HTML error page (html_5xx_rate)


def _fault_name(status: int, hung: bool, stalled: bool, html: bool) -> str | None:
    """The ``counters()["faults"]`` key a response counts under (truncation is counted apart)."""
    if hung:
        return "hung"
    if stalled:
        return "stalled"
    if html:
        return "html_5xx"
    if status == 0:
        return "reset"
    if status == 429:
        return "429"
    return "5xx" if status >= 500 else None


@dataclass(frozen=True)
class _Arrival:
    """What was decided when a request arrived, atomically under the server's lock."""

    now: float  # arrival, monotonic clock
    handled: float  # when the handler got to it, monotonic clock
    limited: bool
    retry_after: int
    draw: faults.Draw


class Simulator:
    """Threaded loopback HTTP server speaking Polygon v3 trades/quotes, with counters and fault knobs."""

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        if not is_loopback(host):
            raise ValueError(f"refusing to bind non-loopback host {host!r}")
        self.config = config if config is not None else SimConfig()
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._base_url: str | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._dice = faults.FaultDice(self.config.seed)
        self._limiter = api.RateLimiter()  # server state: kept by reset_counters
        self._stopping = threading.Event()  # releases handlers that hang on purpose
        self._active = 0
        self._reset_state()

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Simulator:
        if self._server is not None:
            return self
        self._stopping.clear()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = _Server((self.host, self.port), self, family)
        self.port = self._server.server_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._base_url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="smallcaps-simulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is None:
            return
        self._stopping.set()
        srv.shutdown()
        srv.server_close()
        srv.close_all()  # keep-alive connections would otherwise keep being served
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("Simulator not started")
        return self._base_url

    # ---- counters --------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._counts: dict[str, dict[str, int]] = {"trades": {}, "quotes": {}, "other": {}}
        self._total = 0
        self._bytes = 0
        self._max_conc = self._active
        self._log: deque[RequestRecord] = deque(maxlen=1_000_000)
        self._faults = dict.fromkeys(("reset", "truncated", "5xx", "429", "html_5xx", "hung", "stalled"), 0)

    def reset_counters(self) -> None:
        """Zero counters and the request log (the rate limiter's window is server state and is kept)."""
        with self._lock:
            self._reset_state()

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": {k: dict(v) for k, v in self._counts.items()},
                "total": self._total,
                "max_concurrency": self._max_conc,
                "bytes": self._bytes,
                "faults": dict(self._faults),
            }

    def request_log(self) -> list[RequestRecord]:
        with self._lock:
            log = list(self._log)
        log.sort(key=lambda r: r.t)  # records are appended on completion; report arrival order
        return log

    def max_in_window(self, seconds: float = 1.0, served_only: bool = False, handled: bool = False) -> int:
        """Max request arrivals inside any half-open window [t, t + seconds).

        ``handled=True`` counts by when a handler thread got to each request instead (diagnostic).
        """
        log = [r for r in self.request_log() if not served_only or r.status == 200]
        return max_in_window(sorted(r.handled if handled else r.t for r in log), seconds)

    # ---- request handling ------------------------------------------------------------------------

    def _handle(self, h: _Handler, routable: bool = True) -> None:
        cfg = self.config
        req = api.parse_request(h.path, h.headers.get("Authorization"), routable)
        arr = self._arrive(cfg, h.arrival())
        try:
            self._respond(h, cfg, req, arr)
        except OSError:
            h.close_connection = True
        finally:
            with self._lock:
                self._active -= 1

    def _arrive(self, cfg: SimConfig, stamp: float | None = None) -> _Arrival:
        """Arrival bookkeeping, fault draws and the rate limiter, atomically under the lock.

        ``stamp`` is when the bytes arrived (time.time() base); the limiter and the request log
        count the request at that moment, converted to the monotonic clock.
        """
        with self._lock:
            handled = time.monotonic()
            now = handled - max(0.0, time.time() - stamp) if stamp is not None else handled
            self._active += 1
            self._max_conc = max(self._max_conc, self._active)
            draw = self._dice.roll(cfg)
            limited, retry_after = (
                (False, 1) if draw.reset else self._limiter.admit(cfg.rate_limit_rps, now, handled)
            )
        return _Arrival(now, handled, limited, retry_after, draw)

    def _respond(self, h: _Handler, cfg: SimConfig, req: api.ApiRequest, arr: _Arrival) -> None:
        """Decide the response, record it, then send it (or reset or hold the connection)."""
        d = arr.draw
        delay = faults.latency_s(d, cfg)
        if delay > 0:
            time.sleep(delay)
        rid = os.urandom(16).hex()
        if d.reset or d.hang:
            status, body, extra = 0, b"", None  # no answer at all
        else:
            status, body, extra = api.admit(req, cfg, rid, arr.limited, arr.retry_after)
        status, body, html = faults.replace_with_error(status, body, d, cfg, rid)
        rows = 0
        if status == 200:
            status, body, rows = api.serve(req, cfg, rid, self.base_url)
        cut = faults.cut_body(status, body, d, cfg)
        if cut.hang_up:
            h.close_connection = True
        head, body = b"", cut.body
        if status:
            head, body = _frame(status, cut.body, extra, cut.declared, h.close_connection, html)
        # Record before sending: a client that has its response must already see it in the log.
        self._record(req, arr, status, rows, cut, html, len(head) + len(body))
        if d.hang or cut.stalled:
            if cut.stalled:
                _send(h, head, body)
            h.close_connection = True
            faults.hold_open(h.connection, self._stopping)
        elif d.reset:
            h.close_connection = True
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with h.server.conns_lock:
                h.server.rst.add(h.connection)
        else:
            _send(h, head, body, cfg.transfer_bytes_per_s)

    def _record(
        self,
        req: api.ApiRequest,
        arr: _Arrival,
        status: int,
        rows: int,
        cut: faults.Cut,
        html: bool,
        nbytes: int,
    ) -> None:
        """Append the request to the log and count it by endpoint, status and fault."""
        qy, q, hung = req.query, req.params, arr.draw.hang
        rec = RequestRecord(
            t=arr.now,
            handled=arr.handled,
            endpoint=req.endpoint,
            ticker=req.ticker,
            status=status,
            gte_ns=qy.gte if qy else None,
            lt_ns=qy.lt if qy else None,
            cursor=qy.cursor if qy else "cursor" in q,
            rows=rows,
            had_api_key_in_query="apiKey" in q,
            truncated=cut.truncated,
            hung=hung or cut.stalled,
            html=html,
        )
        fault = _fault_name(status, hung, cut.stalled, html)
        with self._lock:
            self._total += 1
            bucket = self._counts[req.endpoint]
            sk = "hung" if hung else "stalled" if cut.stalled else str(status)
            bucket[sk] = bucket.get(sk, 0) + 1
            self._bytes += nbytes
            self._log.append(rec)
            if fault is not None:
                self._faults[fault] += 1
            if cut.truncated:
                self._faults["truncated"] += 1
