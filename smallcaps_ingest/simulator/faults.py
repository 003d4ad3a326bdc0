"""The faults a production client must survive, drawn per request from seeded streams.

The API's own failures: latency, a bounded transfer rate (``paced_write``), 5xx JSON errors,
connection resets, truncated bodies. And what a proxy in front of an API produces: nginx's HTML
502/504 pages, requests read and never answered, and bodies that stall mid-way. The knobs are the
``*_rate`` and ``latency_*`` fields of ``SimConfig``; 429 rate limiting is the API's own behaviour
and lives in ``api.py``.

Every request takes its draws when it arrives (``FaultDice.roll``, under the server's lock) from a
stream seeded by ``SimConfig.seed``, so a run's faults repeat. The proxy faults draw from a second
stream, so that having them did not move the draws of the older faults.
"""

from __future__ import annotations

import random
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import NamedTuple

from smallcaps_ingest.simulator.api import ERR_5XX, error_body
from smallcaps_ingest.simulator.config import SimConfig

#: What nginx (in front of an API, or as a CDN's origin proxy) answers when its upstream fails.
_PROXY_PAGE = (
    "<html>\r\n<head><title>{code} {phrase}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class Draw:
    """One request's fault draws: which faults hit it, and the uniforms that shape them."""

    reset: bool  # the connection is reset, nothing answered
    hang: bool  # read and never answered
    stall: bool  # headers and part of the body, then nothing
    html: bool  # a proxy's 502/504 HTML page instead of the API's answer
    u_5xx: float
    u_code: float
    u_trunc: float
    u_mode: float
    u_cut: float
    u_lat: float
    u_proxy: float


class FaultDice:
    """The two seeded streams; reseeded when ``SimConfig.seed`` changes. Not thread-safe."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._rng = random.Random(seed)
        self._proxy_rng = random.Random(f"proxy|{seed}")

    def roll(self, cfg: SimConfig) -> Draw:
        """Seven draws from the API stream and four from the proxy stream, whatever the knobs."""
        if cfg.seed != self._seed:
            self._rng.seed(cfg.seed)
            self._proxy_rng.seed(f"proxy|{cfg.seed}")
            self._seed = cfg.seed
        u = [self._rng.random() for _ in range(7)]
        p = [self._proxy_rng.random() for _ in range(4)]
        reset = u[0] < cfg.reset_rate
        return Draw(
            reset=reset,
            hang=not reset and p[0] < cfg.hang_rate,
            html=not reset and p[1] < cfg.html_5xx_rate,
            stall=not reset and p[2] < cfg.stall_rate,
            u_5xx=u[1],
            u_code=u[2],
            u_trunc=u[3],
            u_mode=u[4],
            u_cut=u[5],
            u_lat=u[6],
            u_proxy=p[3],
        )


def latency_s(draw: Draw, cfg: SimConfig) -> float:
    """Seconds to wait before answering: ``latency_ms`` +- ``latency_jitter_ms`` (may be <= 0)."""
    return (cfg.latency_ms + cfg.latency_jitter_ms * (2.0 * draw.u_lat - 1.0)) / 1000.0


def replace_with_error(
    status: int, body: bytes, draw: Draw, cfg: SimConfig, rid: str
) -> tuple[int, bytes, bool]:
    """(status, body, is_html): a would-be 200 may become a JSON 500/502/503; then any answer but a
    reset or a 429 may become a proxy's HTML 502/504, whatever the API would have said."""
    if status == 200 and draw.u_5xx < cfg.error_5xx_rate:
        status = (500, 502, 503)[min(2, int(draw.u_code * 3))]
        body = error_body(rid, error=ERR_5XX)
    html = status not in (0, 429) and draw.html
    if html:
        status = 502 if draw.u_proxy < 0.5 else 504
        body = _PROXY_PAGE.format(code=status, phrase=HTTPStatus(status).phrase).encode()
    return status, body, html


class Cut(NamedTuple):
    """A 200 body after the truncation and stall faults."""

    body: bytes  # what is sent
    declared: int | None  # the Content-Length to promise instead of len(body), if any
    truncated: bool
    stalled: bool  # send what there is, then hold the connection (``hold_open``)
    hang_up: bool  # close the connection after sending


def cut_body(status: int, body: bytes, draw: Draw, cfg: SimConfig) -> Cut:
    """Truncate a 200's body (half the time promising the full length and hanging up, half the time
    a short but complete response whose JSON is invalid), or stall it part-way."""
    stalled = status == 200 and draw.stall and len(body) > 1
    truncated = hang_up = False
    declared: int | None = None
    if status == 200 and not stalled and draw.u_trunc < cfg.truncate_rate and len(body) > 1:
        truncated = True
        cut = 1 + int(draw.u_cut * (len(body) - 1))
        if draw.u_mode < 0.5:
            hang_up = True  # promise the full length, send part, hang up
            declared = len(body)
        body = body[:cut]
    if stalled:
        declared = len(body)
        body = body[: 1 + int(draw.u_proxy * (len(body) - 1))]
    return Cut(body, declared, truncated, stalled, hang_up)


def hold_open(conn: socket.socket, stopping: threading.Event) -> None:
    """Keep the connection open and say nothing more, as a hung upstream behind a proxy does,
    until the client hangs up or ``stopping`` is set (so stopping the server never waits on it)."""
    while not stopping.is_set():
        try:
            readable, _, _ = select.select([conn], [], [], 0.1)
            if readable and not conn.recv(1, socket.MSG_PEEK):
                return  # the client closed its end
        except OSError:
            return
        if readable:  # the client sent more (a pipelined request): it stays unanswered
            stopping.wait(0.1)


#: Bytes a paced body is written in at a time (``SimConfig.transfer_bytes_per_s``).
PACE_CHUNK = 64 * 1024


def paced_write(write: Callable[[memoryview], object], body: bytes, rate: float) -> None:
    """Write ``body`` in chunks, each no earlier than its last byte is due at ``rate`` bytes/s from
    the start: the last byte leaves at ``len(body) / rate`` or later, and the client waits for it
    as over a real link of that speed."""
    t0 = time.monotonic()
    view = memoryview(body)
    for at in range(0, len(body), PACE_CHUNK):
        chunk = view[at : at + PACE_CHUNK]
        wait = t0 + (at + len(chunk)) / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        write(chunk)
