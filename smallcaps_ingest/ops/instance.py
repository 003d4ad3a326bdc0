"""What ``status`` reads from the Dagster instance, through Dagster's public API only.

* the "symbols" partitions (``get_dynamic_partitions``) and which are materialized
  (``get_materialized_partitions``);
* every ``event_windows`` materialization, once (``fetch_materializations`` after the last storage
  id read, folded into the :class:`Ledger` kept in ``_state/status_cache.json``): each partition's
  last one carries the partition's counts (events_total, events_complete, bytes), so ``status``
  answers from the instance without walking the disk; the ledger also keeps the lifetime sums and
  the newest materializations (the recent rate). Reading a record costs Dagster's deserialization,
  so records already read are not read again;
* the manifest's last materialization (``get_latest_materialization_event``): events and symbols;
* the runs that failed or are in progress (``get_run_records``).
The same calls serve every instance storage (SQLite, Postgres).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from smallcaps_ingest import storage

ASSET = "event_windows"
MANIFEST_ASSET = "manifest"
PARTITIONS = "symbols"
INGEST_JOB = "ingest_event_windows"
FETCH_PAGE = 1000
RECENT_CAP = 20_000  # the most materializations one fetch_points call reads unless told otherwise
RECENT_LIMIT = 250  # the most recent materializations status reads for its window
DEFAULT_LAST_N = 20
EXAMPLES = 5
NOT_FINISHED = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")
EW = dg.AssetKey(ASSET)


def open_instance(dagster_home: str | None) -> tuple[dg.DagsterInstance | None, str | None]:
    """(the instance at ``dagster_home``, None), or (None, why there is none) -- never raises."""
    if not dagster_home:
        return None, "no Dagster instance: DAGSTER_HOME is not set"
    if not os.path.isdir(dagster_home):
        return None, f"no Dagster instance: DAGSTER_HOME={dagster_home} is not a directory"
    try:
        return dg.DagsterInstance.get(), None
    except Exception as e:  # noqa: BLE001 - reported, status goes on without it
        return None, f"could not open the Dagster instance at {dagster_home}: {type(e).__name__}: {e}"


def _value(md: Mapping[str, Any], key: str) -> Any:
    v = md.get(key)
    return getattr(v, "value", v)


def _num(md: Mapping[str, Any], key: str, kind: type = int) -> Any:
    v = _value(md, key)
    try:
        return kind(v) if v is not None else kind(0)
    except (TypeError, ValueError):
        return kind(0)


def _errors(md: Mapping[str, Any]) -> dict[str, int]:
    errs = _value(md, "errors_by_type")
    if isinstance(errs, str):
        try:
            errs = json.loads(errs)
        except ValueError:
            errs = {}
    if not isinstance(errs, dict):
        return {}
    return {str(k): int(v) for k, v in errs.items() if isinstance(v, int | float)}


@dataclass(frozen=True)
class MatPoint:
    """The figures status needs from one event_windows materialization."""

    ts: float
    partition: str | None
    run_id: str
    storage_id: int
    seconds: float = 0.0
    written: int = 0
    requests: int = 0
    throttled: int = 0
    budget_wait_s: float = 0.0
    errors: Mapping[str, int] = field(default_factory=dict)
    reconciled: bool = False
    events_total: int = 0
    events_complete: int = 0
    bytes: int = 0
    checkpoint: bool = False  # a mid-run record; the run's final record of the partition repeats it


def mat_point(record: Any) -> MatPoint:
    """From a Dagster EventLogRecord of an AssetMaterialization."""
    mat = record.asset_materialization
    md = dict(mat.metadata) if mat is not None else {}
    return MatPoint(
        ts=float(record.timestamp),
        partition=record.partition_key,
        run_id=record.run_id or "",
        storage_id=int(record.storage_id),
        seconds=_num(md, "seconds", float),
        written=_num(md, "events_written"),
        requests=_num(md, "requests"),
        throttled=_num(md, "429s"),
        budget_wait_s=_num(md, "budget_wait_s", float),
        errors=_errors(md),
        reconciled=bool(_value(md, "reconciled")),
        events_total=_num(md, "events_total"),
        events_complete=_num(md, "events_complete"),
        bytes=_num(md, "bytes"),
        checkpoint=bool(_value(md, "checkpoint")),
    )


def fetch_points(
    instance: dg.DagsterInstance,
    *,
    after_timestamp: float | None = None,
    after_storage_id: int | None = None,
    limit: int | None = None,
    ascending: bool = False,
    cap: int = RECENT_CAP,
) -> list[MatPoint]:
    """The event_windows materializations, newest first (or oldest first), at most ``limit``/``cap``."""
    flt = dg.AssetRecordsFilter(
        asset_key=EW, after_timestamp=after_timestamp, after_storage_id=after_storage_id
    )
    out: list[MatPoint] = []
    cursor = None
    want = min(limit, cap) if limit is not None else cap
    while len(out) < want:
        res = instance.fetch_materializations(
            flt, limit=min(FETCH_PAGE, want - len(out)), cursor=cursor, ascending=ascending
        )
        out.extend(mat_point(r) for r in res.records)
        cursor = res.cursor
        if not res.has_more or not res.records:
            break
    return out


def manifest_counts(instance: dg.DagsterInstance) -> tuple[int, int] | None:
    """(events, symbols) from the manifest's last materialization, or None."""
    event = instance.get_latest_materialization_event(dg.AssetKey(MANIFEST_ASSET))
    mat = event.asset_materialization if event is not None else None
    if mat is None or "events" not in mat.metadata:
        return None
    return _num(mat.metadata, "events"), _num(mat.metadata, "symbols")


def throughput(
    points: Sequence[MatPoint],
    *,
    now: float,
    window_s: float,
    fallback: Sequence[MatPoint] = (),
    capped: bool = False,
) -> dict[str, Any]:
    """events/min, requests/s and friends over the recent materializations.

    Window basis (materializations that ended in the last ``window_s``): the span runs from the later
    of the window start and the earliest work start among them (``timestamp - seconds``; in a run that
    materializes many symbols, ``seconds`` counts from the run start) to ``now``, so a stalled ingest
    shows a falling rate. ``capped`` (only the most recent ones were read): the span starts at the
    earliest one read, whose own work then falls before the span and is left out. With none in the
    window, the last N materializations are used instead (span: earliest start to the last one).
    """
    work = _counted(points)
    basis = f"last {window_s / 60:g} min"
    if work and capped and len(work) > 1:
        work = sorted(work, key=lambda p: p.ts)
        start = max(now - window_s, work[0].ts)
        work, end = work[1:], now
        basis += f" (the {len(points)} most recent materializations)"
    elif work:
        start, end = max(now - window_s, min(p.ts - p.seconds for p in work)), now
    else:
        work = _counted(fallback)
        if not work:
            return idle_throughput("no materialization yet")
        basis = f"last {len(work)} materializations (none in the last {window_s / 60:g} min)"
        start, end = min(p.ts - p.seconds for p in work), max(p.ts for p in work)
    elapsed = end - start
    written = sum(p.written for p in work)
    requests = sum(p.requests for p in work)
    ok = elapsed > 0
    return {
        "basis": basis,
        "materializations": len(work),
        "events_written": written,
        "elapsed_s": round(elapsed, 3),
        "events_per_min": round(written / elapsed * 60, 3) if ok else None,
        "requests": requests,
        "requests_per_s": round(requests / elapsed, 4) if ok else None,
        "429s": sum(p.throttled for p in work),
        "budget_wait_s": round(sum(p.budget_wait_s for p in work), 3),
        "idle": basis.startswith("last ") and "none in the last" in basis,
    }


def idle_throughput(basis: str) -> dict[str, Any]:
    return {
        "basis": basis, "materializations": 0, "events_written": 0, "elapsed_s": None,
        "events_per_min": None, "requests": 0, "requests_per_s": None, "429s": 0,
        "budget_wait_s": 0.0, "idle": True,
    }


def _asset_marks(instance: dg.DagsterInstance) -> tuple[bool, float | None, int | None]:
    """(has an asset record, its last wipe timestamp, its last materialization storage id)."""
    recs = instance.get_asset_records([EW])
    if not recs:
        return False, None, None
    entry = recs[0].asset_entry
    details = entry.asset_details
    wipe = getattr(details, "last_wipe_timestamp", None) if details is not None else None
    last = entry.last_materialization_record
    return True, wipe, (last.storage_id if last is not None else None)


_COUNTS = ("materializations", "events_written", "requests", "429s", "reconciled")
LEDGER_VERSION = 3


def _ints(row: Any, n: int) -> bool:
    return isinstance(row, list) and len(row) == n and all(type(x) is int for x in row)


def _lifetime_entry_ok(entry: Mapping[str, Any]) -> bool:
    """A cached ledger entry of the right shape (anything else is recomputed, never trusted)."""
    errors = entry.get("errors_by_type")
    after = entry.get("after_storage_id")
    latest, recent = entry.get("latest"), entry.get("recent")
    return (
        all(type(entry.get(k)) is int for k in _COUNTS)
        and (after is None or type(after) is int)
        and isinstance(errors, dict)
        and all(isinstance(k, str) and type(v) is int for k, v in errors.items())
        and isinstance(latest, dict)
        and all(isinstance(k, str) and _ints(v, 4) for k, v in latest.items())
        and isinstance(recent, list)
        and all(isinstance(r, list) and len(r) == len(fields(MatPoint)) for r in recent)
    )


def _read_cache(cache_path: str | None) -> dict[str, Any]:
    if not cache_path:
        return {}
    try:
        got = json.loads(storage.read_bytes(cache_path))
    except (OSError, ValueError):  # none yet (FileNotFoundError), unreadable, or not JSON
        return {}
    return got if isinstance(got, dict) else {}


def _counted(points: Sequence[MatPoint]) -> list[MatPoint]:
    """The points whose work counts: not reconciled, and not a final record repeating its run's
    checkpoint of the same partition."""
    checkpointed = {(p.run_id, p.partition) for p in points if p.checkpoint}
    return [p for p in points if not p.reconciled
            and (p.checkpoint or (p.run_id, p.partition) not in checkpointed)]


def _fresh_entry(wipe: float | None) -> dict[str, Any]:
    return {"version": LEDGER_VERSION, "wipe": wipe, "after_storage_id": None, **dict.fromkeys(_COUNTS, 0),
            "errors_by_type": {}, "latest": {}, "recent": []}


def _add(entry: dict[str, Any], new: Sequence[MatPoint]) -> None:
    """Fold materializations read in storage order into the ledger, each run's work on a partition
    once: a checkpoint is counted, and the same run's final record of that partition is not."""
    errors = Counter(entry["errors_by_type"])
    pending = entry.setdefault("checkpointed", {})
    for p in new:
        if p.partition is not None:
            entry["latest"][p.partition] = [p.storage_id, p.events_total, p.events_complete, p.bytes]
        pair = f"{p.run_id}/{p.partition}"
        if p.checkpoint:
            pending[pair] = True
        elif pending.pop(pair, False):
            continue
        errors.update(p.errors)
        entry["materializations"] += 1
        entry["events_written"] += p.written
        entry["requests"] += p.requests
        entry["429s"] += p.throttled
        entry["reconciled"] += int(p.reconciled)
    entry["errors_by_type"] = dict(errors)
    entry["recent"] = (entry["recent"] + [list(astuple(p)) for p in new])[-RECENT_LIMIT:]
    entry["after_storage_id"] = max((p.storage_id for p in new), default=entry["after_storage_id"])


@dataclass
class Ledger:
    """What status needs from every event_windows materialization, kept up to date incrementally."""

    totals: dict[str, Any]  # materializations, events_written, requests, 429s, reconciled, errors_by_type
    latest: dict[str, MatPoint]  # partition -> its last materialization's counts
    recent: list[MatPoint]  # the newest RECENT_LIMIT materializations, oldest first

    def window(self, after_timestamp: float) -> list[MatPoint]:
        """As ``fetch_points(after_timestamp=..., limit=RECENT_LIMIT)``: newest first."""
        return [p for p in reversed(self.recent) if p.ts > after_timestamp]

    def last(self, n: int) -> list[MatPoint]:
        return list(reversed(self.recent[-n:])) if n > 0 else []


def read_ledger(instance: dg.DagsterInstance, cache_path: str | None) -> Ledger:
    """Sums over every event_windows materialization, each partition's last one and the newest
    ones, read incrementally.

    The ledger and the last storage id read are kept in ``cache_path`` (keyed by instance), so each
    call reads only the materializations recorded since the previous one (through
    ``fetch_materializations(after_storage_id=...)``); a wipe of the asset, or an instance that
    holds fewer records than the ledger saw, resets it. A cache that cannot be written (read-only
    data dir) only means the next call reads everything again.
    """
    from smallcaps_ingest.core.store import atomic_write_bytes

    key = str(getattr(instance, "root_directory", "") or id(instance))
    exists, wipe, last_id = _asset_marks(instance)
    cache = _read_cache(cache_path)
    entry = cache.get(key) if isinstance(cache.get(key), dict) else None
    stale = (
        not entry
        or not _lifetime_entry_ok(entry)
        or entry.get("version") != LEDGER_VERSION
        or entry.get("wipe") != wipe
        or not exists  # wiped (or never materialized): nothing to sum
        or (entry.get("after_storage_id") or 0) > (last_id or 0)
    )
    if stale:
        entry = _fresh_entry(wipe)
    assert entry is not None
    new: list[MatPoint] = []
    if exists and last_id is not None and last_id != entry["after_storage_id"]:
        new = fetch_points(instance, after_storage_id=entry["after_storage_id"], ascending=True, cap=10**9)
    if new or stale:
        _add(entry, new)
        if cache_path:
            cache[key] = entry
            with contextlib.suppress(OSError):  # a read-only data dir: no cache
                # no directory fsync (a cache); on S3 one PUT
                atomic_write_bytes(json.dumps(cache).encode(), storage.to_path(cache_path), sync_dir=False)
    totals = {k: entry[k] for k in (*_COUNTS, "errors_by_type")}
    latest = {k: MatPoint(0.0, k, "", v[0], events_total=v[1], events_complete=v[2], bytes=v[3])
              for k, v in entry["latest"].items()}
    recent = [MatPoint(*r) for r in entry["recent"]]
    return Ledger(totals, latest, recent)


def lifetime_totals(instance: dg.DagsterInstance, cache_path: str | None) -> dict[str, Any]:
    """The ledger's sums (see :func:`read_ledger`)."""
    return read_ledger(instance, cache_path).totals


def _touches(
    selection: Iterable[str] | None, has_check_selection: bool, job_name: str | None, names: set[str]
) -> bool:
    if selection is not None:
        return any(k in names for k in selection)
    if has_check_selection:
        return False  # a checks-only run writes nothing
    job = job_name or ""
    return job == INGEST_JOB or job.startswith("__ASSET_JOB")


def run_touches(run: Any, asset_names: Iterable[str]) -> bool:
    """Whether a run materializes any of these assets (by its asset selection, else by its job)."""
    selection = getattr(run, "asset_selection", None)
    return _touches(
        None if selection is None else [k.to_user_string() for k in selection],
        bool(getattr(run, "asset_check_selection", None)),
        run.job_name,
        set(asset_names),
    )


def runs_touching(
    instance: dg.DagsterInstance,
    statuses: Sequence[str],
    asset_names: Iterable[str] = (ASSET,),
    exclude_run_id: str | None = None,
) -> list[dict[str, Any]]:
    """The runs in these statuses that materialize any of ``asset_names`` (newest first)."""
    names = tuple(asset_names)
    records = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus(s) for s in statuses]))
    return [
        {
            "run_id": r.dagster_run.run_id,
            "job_name": r.dagster_run.job_name,
            "status": r.dagster_run.status.value,
            "created": datetime.fromtimestamp(r.create_timestamp.timestamp(), UTC).isoformat(),
        }
        for r in records
        if r.dagster_run.run_id != exclude_run_id and run_touches(r.dagster_run, names)
    ]

