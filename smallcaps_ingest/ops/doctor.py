"""``smallcaps-ingest doctor``: check the setup before a long run, without downloading data.

Checks, in order (each reports ok or what is wrong, plainly):

* the key: ``POLYGON_API_KEY`` set (not needed with ``POLYGON_BASE_URL=simulator``);
* the host: name resolved, TCP connected, TLS handshake and certificate when https; latency;
* the request budget's backend (:func:`check_budget_backend`);
* trades and quotes: one 1-row request each, for a liquid ticker on a recent weekday, through the
  same client as a run (its requests take grants from the shared budget); 200 is ok, 403 names the
  plan the endpoint needs (trades: Stocks Developer, quotes: Stocks Advanced), 401 a bad key;
* the Dagster instance (``DagsterInstance.get()``, one query; an instance that needs
  ``dagster instance migrate`` says so);
* the data directory: writable, and its ``_source.json`` (if any) the same source as the API.

The key is never printed: every message goes through the client's scrubber, and the key is not in
any message this module writes.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from smallcaps_ingest import storage
from smallcaps_ingest.config import SIMULATOR, SIMULATOR_KEY, Config
from smallcaps_ingest.core.polygon.budget import BudgetBase, open_budget
from smallcaps_ingest.core.polygon.budget_redis import redacted
from smallcaps_ingest.core.polygon.client import (
    PolygonAuthError,
    PolygonClient,
    PolygonError,
)
from smallcaps_ingest.core.polygon.stats import FetchStats
from smallcaps_ingest.core.store import SOURCE_FILE

LIQUID_TICKER = "AAPL"
ET = ZoneInfo("America/New_York")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def recent_weekday(today: datetime | None = None) -> datetime:
    """10:00 ET on the last weekday before today (ET): a day whose data is complete."""
    day = (today or datetime.now(UTC)).astimezone(ET).date() - timedelta(days=1)
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return datetime(day.year, day.month, day.day, 10, 0, tzinfo=ET)


def check_host(base_url: str, timeout: float = 5.0) -> Check:
    """Resolve, connect (and TLS-handshake with certificate verification when https)."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    t0 = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            connected = time.perf_counter() - t0
            if parts.scheme != "https":
                return Check(
                    "host", True, f"{host}:{port} reachable (plain HTTP), connect {connected * 1000:.0f} ms"
                )
            with ssl.create_default_context().wrap_socket(sock, server_hostname=host) as tls:
                total = time.perf_counter() - t0
                return Check(
                    "host",
                    True,
                    f"{host}:{port} reachable, {tls.version()} certificate verified, "
                    f"connect {connected * 1000:.0f} ms, with TLS {total * 1000:.0f} ms",
                )
    except ssl.SSLError as e:
        return Check("host", False, f"TLS handshake with {host}:{port} failed: {e}")
    except OSError as e:
        return Check("host", False, f"cannot reach {host}:{port}: {e}")


def check_endpoint(client: PolygonClient, kind: str, ticker: str, at: datetime) -> Check:
    """One request of ``limit=1`` (a budget grant like any other); 200 ok, 401/403 explained."""
    start = int(at.timestamp()) * 1_000_000_000
    params = {
        "timestamp.gte": start,
        "timestamp.lt": start + 3600 * 1_000_000_000,
        "order": "asc",
        "sort": "timestamp",
        "limit": 1,
    }
    t0 = time.perf_counter()
    try:
        frame, _ = client.get_page(kind, f"{client.base_url}/v3/{kind}/{ticker}", params, FetchStats())
    except PolygonAuthError as e:
        return Check(kind, False, str(e))
    except PolygonError as e:
        return Check(kind, False, f"{kind} request failed: {e}")
    ms = (time.perf_counter() - t0) * 1000
    return Check(
        kind, True, f"HTTP 200, {frame.height} row for {ticker} on {at:%Y-%m-%d}, {ms:.0f} ms: entitled"
    )


def check_instance(dagster_home: str | None) -> Check:
    """The Dagster instance of ``DAGSTER_HOME``, through its public API (one cheap query)."""
    if not dagster_home:
        return Check("instance", False, "DAGSTER_HOME is not set: runs would use a throwaway instance")
    try:
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            instance.get_runs(limit=1)
            parts = instance.get_dynamic_partitions("symbols")
            return Check(
                "instance", True, f"{instance.root_directory}: reachable, {len(parts)} symbol partitions"
            )
    except Exception as e:  # noqa: BLE001 - every failure is the check's answer
        text = f"{type(e).__name__}: {e}"
        if "migrat" in text.lower() or "out of date" in text.lower():
            text += " (run `dagster instance migrate`)"
        return Check("instance", False, f"instance at {dagster_home}: {text}")


def check_budget_backend(url: str, max_rps: float, bucket: str) -> tuple[BudgetBase | None, Check]:
    """Open the shared request budget a run would use (``POLYGON_BUDGET_URL``: a SQLite file or
    Redis) and read its current rate: (the budget, for the requests' grants, or None; the check)."""
    where = redacted(url)
    try:
        budget = open_budget(url, max_rps, bucket=bucket, unavailable_timeout=5.0)
        rate = budget.effective_rps
    except Exception as e:  # noqa: BLE001 - every failure is the check's answer
        detail = str(e).replace(url, where)
        why = f"{type(e).__name__}: {detail}"
        return None, Check("budget", False, f"request budget backend unusable ({where}): {why}")
    return budget, Check("budget", True, f"{where}: ok, {rate:g} of {max_rps:g} req/s available")


def check_data_dir(data_dir: str, source: str | None) -> Check:
    """Writable (a temporary file, or on S3 a probe object, is created and removed), and
    ``_source.json`` agrees with ``source``."""
    import json

    try:
        storage.check_writable(data_dir)
    except Exception as e:  # noqa: BLE001 - OSError locally; on S3 also botocore's (no bucket, denied)
        return Check("data dir", False, f"{data_dir} is not writable: {type(e).__name__}: {e}")
    path = storage.join(data_dir, SOURCE_FILE)
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        return Check(
            "data dir", True, f"{data_dir}: writable, no {SOURCE_FILE} yet (the first run records it)"
        )
    except OSError as e:
        return Check("data dir", False, f"{path} is unreadable: {e}")
    try:
        recorded = json.loads(raw).get("source")
    except (ValueError, AttributeError) as e:
        return Check("data dir", False, f"{path} is unreadable: {e}")
    if source is None:
        return Check(
            "data dir", False, f"{data_dir}: writable; {SOURCE_FILE} says {recorded!r}, API source unknown"
        )
    if recorded != source:
        return Check(
            "data dir",
            False,
            f"{data_dir} holds data from {recorded!r} but the API is {source!r}: a run would refuse to "
            "write there (simulated and real data never mix); use another SMALLCAPS_DATA_DIR",
        )
    return Check("data dir", True, f"{data_dir}: writable, {SOURCE_FILE} matches the API ({source})")


def run_checks(
    config: Config, ticker: str = LIQUID_TICKER, emit: Callable[[Check], None] | None = None
) -> list[Check]:
    """Every check (a failed key or host skips the requests); ``emit`` sees each as it finishes."""
    checks: list[Check] = []
    base, key = config.base_url.strip(), config.api_key

    def add(c: Check) -> None:
        if key:
            c.detail = c.detail.replace(key, "***")
        checks.append(c)
        if emit is not None:
            emit(c)

    sim = None
    if config.is_simulator:
        from smallcaps_ingest.simulator import Simulator

        sim = Simulator().start()
        base, key = sim.base_url, key or SIMULATOR_KEY
        add(Check("key", True, "POLYGON_BASE_URL=simulator: the bundled simulator, no key needed"))
    elif key:
        add(Check("key", True, "POLYGON_API_KEY is set (not shown)"))
    else:
        add(Check("key", False, "POLYGON_API_KEY is not set (or set POLYGON_BASE_URL=simulator)"))
    try:
        host = check_host(base)
        add(host)
        budget, check = check_budget_backend(config.budget_url, config.max_rps, urlsplit(base).netloc or base)
        add(check)
        source = None
        if key and host.ok and budget is not None:
            client = PolygonClient(base, key, budget, workers=1, max_retries=1, read_timeout=15.0,
                                   source=SIMULATOR if sim is not None else "polygon")
            try:
                at = recent_weekday()
                for kind in ("trades", "quotes"):
                    add(check_endpoint(client, kind, ticker, at))
                source = client.source
            finally:
                client.close()
        else:
            why = "no key" if not key else "no host" if not host.ok else "no request budget"
            add(Check("trades", False, f"not tried ({why})"))
            add(Check("quotes", False, f"not tried ({why})"))
        if budget is not None:
            budget.close()
        add(check_instance(config.dagster_home))
        add(check_data_dir(config.data_dir, source))
    finally:
        if sim is not None:
            sim.stop()
    return checks


def render(c: Check) -> str:
    return f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<9} {c.detail}"
