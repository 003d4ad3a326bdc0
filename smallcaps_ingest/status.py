"""Where the ingest stands: disk against the manifest, throughput from the instance, cleanup and reconcile.

Three sources, read cheaply:

* the tree ``event_windows/symbol=SYM/event=EVENT_ID/{trades,quotes}.parquet`` -- names and sizes only
  (``os.scandir``/``os.listdir`` and one ``stat`` per data file, for the bytes; no parquet is opened);
* the manifest (``$SMALLCAPS_DATA_DIR/manifest.parquet``, two columns read);
* the Dagster instance (``DAGSTER_HOME``): the "symbols" partitions, the ``event_windows`` materializations
  (their metadata: events_written, requests, seconds, errors_by_type...) and the runs.

``status`` forks the disk and manifest work into a child process before Dagster is imported, so the
scan runs on another core while the parent imports Dagster and opens the instance (on 100,000 events
each takes about 0.85 s of CPU here; the Dagster import alone is the floor of a full ``status``). The
module imports nothing heavy at import time (stdlib only); Dagster and polars are imported inside the
functions that need them.

Definitions used throughout: an event is *done* when both files exist, *partial* when one does,
*missing* when the manifest has it and the disk has neither; *extra* events are on disk but not in the
manifest; a *tmp orphan* is a ``*.tmp*`` file left by an interrupted write.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import stat
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# The same as store.FILES / store.TMP_MARK (a test pins them): repeated here so that the scan, which
# may run in a forked child, imports neither polars nor Dagster.
FILES = ("trades.parquet", "quotes.parquet")
TMP_MARK = ".tmp"
SOURCE_FILE = "_source.json"
EVENT_PREFIX = "event="
SYMBOL_PREFIX = "symbol="
WINDOWS_DIR = "event_windows"
MANIFEST_FILE = "manifest.parquet"
STATE_DIR = "_state"
REPORTS_DIR = "_reports"
CACHE_FILE = "status_cache.json"

ASSET = "event_windows"
MANIFEST_ASSET = "manifest"
PARTITIONS = "symbols"
INGEST_JOB = "ingest_event_windows"
DEFAULT_WINDOW_MINUTES = 30.0
DEFAULT_LAST_N = 20
DEFAULT_MAX_RPS = 90.0
FETCH_PAGE = 1000
RECENT_CAP = 20_000  # the most materializations one fetch_points call reads unless told otherwise
RECENT_LIMIT = 250  # the most recent materializations status reads for its window (each costs ~0.25 ms)
EXAMPLES = 5


class StatusError(RuntimeError):
    """A condition the CLI reports as a clear one-line error (exit code 1)."""


def default_data_dir() -> str:
    return os.path.abspath(os.environ.get("SMALLCAPS_DATA_DIR") or "./data")


def max_rps_from_env() -> float:
    raw = os.environ.get("POLYGON_MAX_RPS", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_MAX_RPS
    except ValueError:
        return DEFAULT_MAX_RPS
    return value if value > 0 else DEFAULT_MAX_RPS


# ----------------------------------------------------------------------------------------------
# The disk scan (hot path)
# ----------------------------------------------------------------------------------------------
@dataclass
class SymbolDisk:
    """One symbol directory: which events are complete or partial, and what else lies there."""

    complete: frozenset[str] = frozenset()
    partial: frozenset[str] = frozenset()
    orphans: tuple[str, ...] = ()  # absolute paths of *.tmp* files
    empty_dirs: int = 0  # event directories holding neither file
    files: int = 0  # trades/quotes files present
    bytes: int = 0  # their sizes
    # detail=True only: complete event -> (trades size, trades mtime_ns, quotes size, quotes mtime_ns)
    stats: dict[str, tuple[int, int, int, int]] | None = None


@dataclass
class TreeScan:
    symbols: dict[str, SymbolDisk] = field(default_factory=dict)
    orphans: tuple[str, ...] = ()  # *.tmp* files directly under event_windows/
    seconds: float = 0.0

    @property
    def files(self) -> int:
        return sum(s.files for s in self.symbols.values())

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.symbols.values())

    def all_orphans(self) -> list[str]:
        return [*self.orphans, *(p for s in self.symbols.values() for p in s.orphans)]


def scan_symbol_dir(root: str, detail: bool = False) -> SymbolDisk:
    """Scan one ``symbol=SYM`` directory: a listing per event directory and a stat per data file.

    Same verdicts as ``store.scan_symbol`` (a test checks it), but cheaper: ``os.listdir`` on event
    directories (names only), plain string paths, and a stat only for trades/quotes files (the bytes).
    """
    trades_name, quotes_name = FILES
    complete: set[str] = set()
    partial: set[str] = set()
    orphans: list[str] = []
    stats: dict[str, tuple[int, int, int, int]] | None = {} if detail else None
    empty = files = size = 0
    sep = os.sep
    stat_ = os.stat
    listdir = os.listdir
    try:
        top = os.scandir(root)
    except (FileNotFoundError, NotADirectoryError):
        return SymbolDisk()
    with top:
        for entry in top:
            name = entry.name
            if not name.startswith(EVENT_PREFIX):
                if TMP_MARK in name:
                    orphans.append(entry.path)
                continue
            path = entry.path
            try:
                names = listdir(path)
            except NotADirectoryError:
                if TMP_MARK in name:
                    orphans.append(path)
                continue
            except FileNotFoundError:  # removed while we looked
                continue
            t = q = None
            for f in names:
                if f in FILES:
                    try:
                        st = stat_(path + sep + f)
                    except FileNotFoundError:
                        continue
                    files += 1
                    size += st.st_size
                    if f == trades_name:
                        t = st
                    else:
                        q = st
                elif TMP_MARK in f:
                    orphans.append(path + sep + f)
            eid = name[len(EVENT_PREFIX) :]
            if t is not None and q is not None:
                complete.add(eid)
                if stats is not None:
                    stats[eid] = (t.st_size, t.st_mtime_ns, q.st_size, q.st_mtime_ns)
            elif t is not None or q is not None:
                partial.add(eid)
            else:
                empty += 1
    return SymbolDisk(frozenset(complete), frozenset(partial), tuple(orphans), empty, files, size, stats)


def list_symbol_dirs(data_dir: str | os.PathLike[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(symbol, path) of every ``symbol=`` directory, and the *.tmp* files directly under the root."""
    root = os.path.join(os.fspath(data_dir), WINDOWS_DIR)
    dirs: list[tuple[str, str]] = []
    orphans: list[str] = []
    try:
        it = os.scandir(root)
    except FileNotFoundError:
        return [], []
    with it:
        for e in it:
            if e.name.startswith(SYMBOL_PREFIX) and e.is_dir():
                dirs.append((e.name[len(SYMBOL_PREFIX) :], e.path))
            elif TMP_MARK in e.name and e.is_file(follow_symlinks=False):
                orphans.append(e.path)
    dirs.sort()
    return dirs, orphans


ProgressFn = Callable[[int, int], None]


def _scan_dirs(
    dirs: Sequence[tuple[str, str]],
    detail: bool,
    progress: ProgressFn | None,
    scale: int = 1,
    total: int | None = None,
) -> dict[str, SymbolDisk]:
    out: dict[str, SymbolDisk] = {}
    n = total if total is not None else len(dirs)
    for i, (sym, path) in enumerate(dirs, 1):
        out[sym] = scan_symbol_dir(path, detail)
        if progress is not None:
            progress(min(i * scale, n), n)
    return out


def scan_tree(
    data_dir: str | os.PathLike[str],
    *,
    detail: bool = False,
    workers: int = 1,
    progress: ProgressFn | None = None,
) -> TreeScan:
    """Scan every symbol directory; ``workers > 1`` splits the symbols over forked processes."""
    t0 = time.perf_counter()
    dirs, root_orphans = list_symbol_dirs(data_dir)
    workers = max(1, min(workers, len(dirs) or 1))
    if workers == 1 or not hasattr(os, "fork"):
        symbols = _scan_dirs(dirs, detail, progress)
    else:
        # Interleaved slices keep the shares even; this process scans slice 0 and draws the progress.
        slices = [dirs[i::workers] for i in range(workers)]
        jobs = [fork_call(_scan_dirs, s, detail, None) for s in slices[1:]]
        symbols = _scan_dirs(slices[0], detail, progress, scale=workers, total=len(dirs))
        for j in jobs:
            symbols.update(j.result())
        symbols = dict(sorted(symbols.items()))
    return TreeScan(symbols, tuple(root_orphans), time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# A function call in a forked child (results come back pickled through a pipe)
# ----------------------------------------------------------------------------------------------
class ForkedCall:
    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any):
        self._value: Any = None
        self._pid = 0
        self._fd = -1
        sys.stdout.flush()
        sys.stderr.flush()
        r, w = os.pipe()
        try:
            pid = os.fork()
        except (AttributeError, OSError):  # no fork here (or no resources for one): run in this process
            os.close(r)
            os.close(w)
            self._value = ("ok", fn(*args, **kwargs))
            return
        if pid == 0:  # child
            code = 0
            try:
                os.close(r)
                try:
                    payload: tuple[str, Any] = ("ok", fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001 - reported to the parent
                    payload = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
                data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
                with os.fdopen(w, "wb") as fh:
                    fh.write(data)
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        self._pid, self._fd = pid, r

    def result(self) -> Any:
        if self._pid:
            with os.fdopen(self._fd, "rb") as fh:
                data = fh.read()
            os.waitpid(self._pid, 0)
            self._pid = 0
            self._value = pickle.loads(data) if data else ("error", "the child process died")
        kind, value = self._value
        if kind != "ok":
            raise RuntimeError(f"forked worker failed: {value}")
        return value


def fork_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ForkedCall:
    return ForkedCall(fn, *args, **kwargs)


# ----------------------------------------------------------------------------------------------
# The manifest and the comparison
# ----------------------------------------------------------------------------------------------
def manifest_path(data_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(data_dir), MANIFEST_FILE)


def read_manifest_ids(data_dir: str | os.PathLike[str]) -> dict[str, frozenset[str]] | None:
    """symbol -> its manifest event ids; None when there is no manifest yet."""
    path = manifest_path(data_dir)
    if not os.path.isfile(path):
        return None
    import polars as pl

    df = pl.read_parquet(path, columns=["symbol", "event_id"])
    grouped = df.group_by("symbol").agg(pl.col("event_id"))
    return {
        s: frozenset(ids)
        for s, ids in zip(grouped["symbol"].to_list(), grouped["event_id"].to_list(), strict=True)
    }


@dataclass(frozen=True)
class SymbolCoverage:
    symbol: str
    events: int  # in the manifest
    done: int
    partial: int
    missing: int
    extra: int  # complete or partial on disk, not in the manifest
    files: int
    bytes: int

    @property
    def complete(self) -> bool:
        return self.events > 0 and self.done == self.events


def coverage(manifest: Mapping[str, frozenset[str]] | None, scan: TreeScan) -> dict[str, SymbolCoverage]:
    """Per symbol (manifest symbols and symbols on disk), the manifest events done/partial/missing."""
    out: dict[str, SymbolCoverage] = {}
    manifest = manifest or {}
    empty = SymbolDisk()
    for sym in sorted(set(manifest) | set(scan.symbols)):
        want = manifest.get(sym, frozenset())
        disk = scan.symbols.get(sym, empty)
        done = len(want & disk.complete) if want else 0
        partial = len(want & disk.partial) if want else 0
        extra = len(disk.complete - want) + len(disk.partial - want)
        out[sym] = SymbolCoverage(
            sym, len(want), done, partial, len(want) - done - partial, extra, disk.files, disk.bytes
        )
    return out


def _rel(data_dir: str, path: str) -> str:
    try:
        return os.path.relpath(path, data_dir)
    except ValueError:
        return path


def disk_summary(data_dir: str, *, workers: int = 1, progress: ProgressFn | None = None) -> dict[str, Any]:
    """The disk and manifest half of ``status`` (no Dagster): plain JSON-able values."""
    t0 = time.perf_counter()
    manifest_error = None
    try:
        manifest = read_manifest_ids(data_dir)
    except Exception as e:  # noqa: BLE001 - reported; status goes on with the disk alone
        manifest, manifest_error = None, f"{type(e).__name__}: {e}"
    t_manifest = time.perf_counter() - t0
    scan = scan_tree(data_dir, workers=workers, progress=progress)
    t1 = time.perf_counter()
    cov = coverage(manifest, scan)
    orphans = scan.all_orphans()
    symbols_manifest = [c for c in cov.values() if c.events]
    out: dict[str, Any] = {
        "manifest": {
            "path": manifest_path(data_dir),
            "present": manifest is not None,
            "error": manifest_error,
            "events": sum(len(v) for v in manifest.values()) if manifest is not None else None,
            "symbols": len(manifest) if manifest is not None else None,
        },
        "events": {
            "total": sum(c.events for c in cov.values()) if manifest is not None else None,
            "done": sum(c.done for c in cov.values()) if manifest is not None else None,
            "partial": sum(c.partial for c in cov.values()) if manifest is not None else None,
            "missing": sum(c.missing for c in cov.values()) if manifest is not None else None,
            "extra_on_disk": sum(c.extra for c in cov.values()),
            "complete_on_disk": sum(len(s.complete) for s in scan.symbols.values()),
            "partial_on_disk": sum(len(s.partial) for s in scan.symbols.values()),
            "empty_event_dirs": sum(s.empty_dirs for s in scan.symbols.values()),
        },
        "symbols": {
            "total": len(symbols_manifest) if manifest is not None else None,
            "complete": sum(1 for c in symbols_manifest if c.complete) if manifest is not None else None,
            "started": sum(1 for c in symbols_manifest if 0 < c.done < c.events)
            if manifest is not None
            else None,
            "not_started": sum(1 for c in symbols_manifest if c.done == 0) if manifest is not None else None,
            "on_disk": len(scan.symbols),
        },
        "disk": {
            "files": scan.files,
            "bytes": scan.bytes,
            "tmp_orphans": len(orphans),
            "tmp_orphan_examples": [_rel(data_dir, p) for p in sorted(orphans)[:EXAMPLES]],
        },
        "timings_s": {
            "manifest": round(t_manifest, 4),
            "scan": round(scan.seconds, 4),
            "compare": round(time.perf_counter() - t1, 4),
        },
    }
    ev = out["events"]
    if manifest is not None:
        ev["pct_done"] = round(100.0 * ev["done"] / ev["total"], 2) if ev["total"] else 100.0
    return out


# ----------------------------------------------------------------------------------------------
# The Dagster instance
# ----------------------------------------------------------------------------------------------
def open_instance() -> tuple[Any | None, str | None]:
    """(DagsterInstance, None), or (None, why there is none) -- never raises."""
    home = os.environ.get("DAGSTER_HOME", "").strip()
    if not home:
        return None, "no Dagster instance: DAGSTER_HOME is not set"
    if not os.path.isdir(home):
        return None, f"no Dagster instance: DAGSTER_HOME={home} is not a directory"
    try:
        import dagster as dg

        return dg.DagsterInstance.get(), None
    except Exception as e:  # noqa: BLE001 - reported, status goes on without it
        return None, f"could not open the Dagster instance at {home}: {type(e).__name__}: {e}"


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


def _num(md: Mapping[str, Any], key: str, kind: type = int) -> Any:
    v = md.get(key)
    v = getattr(v, "value", v)
    try:
        return kind(v) if v is not None else kind(0)
    except (TypeError, ValueError):
        return kind(0)


def mat_point(record: Any) -> MatPoint:
    """From a Dagster EventLogRecord of an AssetMaterialization."""
    mat = record.asset_materialization
    md = dict(mat.metadata) if mat is not None else {}
    errs = md.get("errors_by_type")
    errs = getattr(errs, "value", errs)
    if isinstance(errs, str):
        try:
            errs = json.loads(errs)
        except ValueError:
            errs = {}
    errors = (
        {str(k): int(v) for k, v in errs.items() if isinstance(v, int | float)}
        if isinstance(errs, dict)
        else {}
    )
    rec = md.get("reconciled")
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
        errors=errors,
        reconciled=bool(getattr(rec, "value", rec)),
    )


def fetch_points(
    instance: Any,
    *,
    after_timestamp: float | None = None,
    after_storage_id: int | None = None,
    limit: int | None = None,
    ascending: bool = False,
    cap: int = RECENT_CAP,
) -> list[MatPoint]:
    import dagster as dg

    flt = dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(ASSET), after_timestamp=after_timestamp, after_storage_id=after_storage_id
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
    work = [p for p in points if not p.reconciled]
    basis = f"last {window_s / 60:g} min"
    if work and capped and len(work) > 1:
        work = sorted(work, key=lambda p: p.ts)
        start = max(now - window_s, work[0].ts)
        work = work[1:]
        end = now
        basis += f" (the {len(points)} most recent materializations)"
    elif work:
        start = max(now - window_s, min(p.ts - p.seconds for p in work))
        end = now
    else:
        work = [p for p in fallback if not p.reconciled]
        if not work:
            return {
                "basis": "no materialization yet",
                "materializations": 0,
                "events_written": 0,
                "elapsed_s": None,
                "events_per_min": None,
                "requests": 0,
                "requests_per_s": None,
                "429s": 0,
                "budget_wait_s": 0.0,
                "idle": True,
            }
        basis = f"last {len(work)} materializations (none in the last {window_s / 60:g} min)"
        start = min(p.ts - p.seconds for p in work)
        end = max(p.ts for p in work)
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


def _asset_marks(instance: Any) -> tuple[bool, float | None, int | None]:
    """(has an asset record, its last wipe timestamp, its last materialization storage id)."""
    import dagster as dg

    recs = instance.get_asset_records([dg.AssetKey(ASSET)])
    if not recs:
        return False, None, None
    entry = recs[0].asset_entry
    details = entry.asset_details
    wipe = getattr(details, "last_wipe_timestamp", None) if details is not None else None
    last = entry.last_materialization_record
    return True, wipe, (last.storage_id if last is not None else None)


def lifetime_totals(instance: Any, cache_path: str | None) -> dict[str, Any]:
    """Sums over every event_windows materialization, read incrementally.

    The sums and the last storage id read are kept in ``cache_path`` (keyed by instance), so each call
    reads only the materializations recorded since the previous one; a wipe of the asset resets it.
    """
    key = str(getattr(instance, "root_directory", "") or id(instance))
    exists, wipe, last_id = _asset_marks(instance)
    cache: dict[str, Any] = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path) as fh:
                cache = json.load(fh)
        except (OSError, ValueError):
            cache = {}
    entry = cache.get(key) if isinstance(cache.get(key), dict) else None
    stale = (
        not entry
        or entry.get("version") != 1
        or entry.get("wipe") != wipe
        or not exists  # wiped (or never materialized): nothing to sum
        or (entry.get("after_storage_id") or 0) > (last_id or 0)
    )
    if stale:
        entry = {
            "version": 1,
            "wipe": wipe,
            "after_storage_id": None,
            "materializations": 0,
            "events_written": 0,
            "requests": 0,
            "429s": 0,
            "reconciled": 0,
            "errors_by_type": {},
        }
    new = []
    if exists and last_id is not None and last_id != entry["after_storage_id"]:
        new = fetch_points(instance, after_storage_id=entry["after_storage_id"], ascending=True, cap=10**9)
    if new or stale:
        errors = Counter(entry["errors_by_type"])
        for p in new:
            errors.update(p.errors)
            entry["materializations"] += 1
            entry["events_written"] += p.written
            entry["requests"] += p.requests
            entry["429s"] += p.throttled
            entry["reconciled"] += int(p.reconciled)
        entry["errors_by_type"] = dict(errors)
        entry["after_storage_id"] = max((p.storage_id for p in new), default=None)
        if cache_path:
            cache[key] = entry
            try:
                os.makedirs(os.path.dirname(cache_path), exist_ok=True)
                tmp = f"{cache_path}{TMP_MARK}.{os.getpid()}"
                with open(tmp, "w") as fh:
                    json.dump(cache, fh)
                os.replace(tmp, cache_path)
            except OSError:
                pass  # a read-only data dir: no cache, the next call reads everything again
    return {k: v for k, v in entry.items() if k not in ("version", "wipe", "after_storage_id")}


NOT_FINISHED = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")


def run_touches(run: Any, asset_names: Iterable[str]) -> bool:
    """Whether a run materializes any of these assets (by its asset selection, else by its job)."""
    names = set(asset_names)
    selection = getattr(run, "asset_selection", None)
    if selection is not None:
        return any(k.to_user_string() in names for k in selection)
    if getattr(run, "asset_check_selection", None):
        return False  # a checks-only run writes nothing
    job = run.job_name or ""
    return job == INGEST_JOB or job.startswith("__ASSET_JOB")


def runs_touching(
    instance: Any,
    statuses: Sequence[str],
    asset_names: Iterable[str] = (ASSET,),
    exclude_run_id: str | None = None,
) -> list[dict[str, Any]]:
    import dagster as dg

    names = tuple(asset_names)
    records = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus(s) for s in statuses]))
    out = []
    for r in records:
        run = r.dagster_run
        if run.run_id != exclude_run_id and run_touches(run, names):
            out.append(
                {
                    "run_id": run.run_id,
                    "job_name": run.job_name,
                    "status": run.status.value,
                    "created": datetime.fromtimestamp(r.create_timestamp.timestamp(), UTC).isoformat(),
                }
            )
    return out


def instance_summary(
    instance: Any, *, now: float, window_s: float, last_n: int = DEFAULT_LAST_N, cache_path: str | None = None
) -> dict[str, Any]:
    """The Dagster half of ``status``."""
    import dagster as dg

    t0 = time.perf_counter()
    key = dg.AssetKey(ASSET)
    partitions = list(instance.get_dynamic_partitions(PARTITIONS))
    materialized = instance.get_materialized_partitions(key)
    recent = fetch_points(instance, after_timestamp=now - window_s, limit=RECENT_LIMIT)
    fallback = [] if recent else fetch_points(instance, limit=last_n)
    tp = throughput(recent, now=now, window_s=window_s, fallback=fallback, capped=len(recent) >= RECENT_LIMIT)
    life = lifetime_totals(instance, cache_path)
    recent_errors: Counter[str] = Counter()
    for p in recent or fallback:
        recent_errors.update(p.errors)
    failed = runs_touching(instance, ["FAILURE"])
    running = runs_touching(instance, NOT_FINISHED)
    return {
        "instance": {
            "present": True,
            "dagster_home": getattr(instance, "root_directory", None),
            "partitions": len(partitions),
            "materialized_partitions": len(materialized),
            "materializations": life["materializations"],
            "reconciled_materializations": life["reconciled"],
            "runs_in_progress": len(running),
            "runs_in_progress_ids": [r["run_id"] for r in running[:EXAMPLES]],
            "message": None
            if partitions or materialized
            else (
                "the instance has no 'symbols' partitions and no event_windows materialization yet "
                "(materialize the manifest asset first)"
            ),
        },
        "throughput": tp,
        "errors": {
            "by_type": dict(sorted(life["errors_by_type"].items())),
            "total": sum(life["errors_by_type"].values()),
            "recent_by_type": dict(sorted(recent_errors.items())),
            "failed_runs": len(failed),
            "failed_run_ids": [r["run_id"] for r in failed[:EXAMPLES]],
        },
        "lifetime": {
            "events_written": life["events_written"],
            "requests": life["requests"],
            "429s": life["429s"],
        },
        "timings_s": {"instance_queries": round(time.perf_counter() - t0, 4)},
    }


def _no_instance(message: str) -> dict[str, Any]:
    return {
        "instance": {
            "present": False,
            "dagster_home": os.environ.get("DAGSTER_HOME") or None,
            "partitions": None,
            "materialized_partitions": None,
            "materializations": None,
            "reconciled_materializations": None,
            "runs_in_progress": None,
            "runs_in_progress_ids": [],
            "message": message,
        },
        "throughput": {
            "basis": "no instance",
            "materializations": 0,
            "events_written": 0,
            "elapsed_s": None,
            "events_per_min": None,
            "requests": 0,
            "requests_per_s": None,
            "429s": 0,
            "budget_wait_s": 0.0,
            "idle": True,
        },
        "errors": {
            "by_type": {},
            "total": 0,
            "recent_by_type": {},
            "failed_runs": None,
            "failed_run_ids": [],
        },
        "lifetime": {"events_written": None, "requests": None, "429s": None},
        "timings_s": {},
    }


def combine(
    data_dir: str, disk: Mapping[str, Any], inst: Mapping[str, Any], *, now: float, max_rps: float
) -> dict[str, Any]:
    """The full status dict (the ``--json`` schema)."""
    out: dict[str, Any] = {
        "data_dir": data_dir,
        "generated_at": datetime.fromtimestamp(now, UTC).isoformat(),
        **{k: v for k, v in disk.items() if k != "timings_s"},
        **{k: v for k, v in inst.items() if k != "timings_s"},
    }
    tp = dict(out["throughput"])
    remaining = None
    if disk["events"]["total"] is not None:
        remaining = disk["events"]["total"] - disk["events"]["done"]
    # from the unrounded figures (events_per_min is rounded for display)
    rate = (
        tp["events_written"] / tp["elapsed_s"] * 60
        if tp.get("elapsed_s") and tp.get("events_written")
        else None
    )
    tp["remaining_events"] = remaining
    if remaining == 0:
        tp["eta_s"], tp["eta"] = 0.0, "done"
    elif remaining and rate:
        tp["eta_s"] = round(remaining / rate * 60, 1)
        tp["eta"] = format_duration(tp["eta_s"])
    else:
        tp["eta_s"], tp["eta"] = None, None
    out["throughput"] = tp
    rps = tp.get("requests_per_s")
    out["api"] = {
        "requests_per_s": rps,
        "max_rps": max_rps,
        "utilization": round(rps / max_rps, 4) if rps is not None and max_rps else None,
        "requests": tp.get("requests", 0),
        "429s": tp.get("429s", 0),
        "budget_wait_s": tp.get("budget_wait_s", 0.0),
        "basis": tp.get("basis"),
    }
    notes = []
    if disk["manifest"].get("error"):
        notes.append(
            f"the manifest at {disk['manifest']['path']} could not be read: {disk['manifest']['error']}"
        )
    elif not disk["manifest"]["present"]:
        notes.append(
            f"no manifest yet at {disk['manifest']['path']}: materialize the manifest asset first "
            "(events cannot be counted as done/partial/missing without it)"
        )
    if inst["instance"]["message"]:
        notes.append(inst["instance"]["message"])
    if disk["disk"]["tmp_orphans"]:
        notes.append(
            f"{disk['disk']['tmp_orphans']} *.tmp* orphan(s) on disk: `smallcaps-ingest cleanup --dry-run`"
        )
    out["notes"] = notes
    out["timings_s"] = {**disk.get("timings_s", {}), **inst.get("timings_s", {})}
    return out


def collect_status(
    data_dir: str,
    *,
    instance: Any = None,
    use_instance: bool = True,
    now: float | None = None,
    window_minutes: float = DEFAULT_WINDOW_MINUTES,
    last_n: int = DEFAULT_LAST_N,
    max_rps: float | None = None,
    parallel: bool = False,
    workers: int = 1,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Everything ``status`` reports. ``instance=None`` opens the one at DAGSTER_HOME (if any).

    ``parallel=True`` forks the disk and manifest work before Dagster is imported (the CLI path).
    """
    t0 = time.perf_counter()
    data_dir = os.path.abspath(data_dir)
    job = fork_call(disk_summary, data_dir, workers=workers, progress=progress) if parallel else None
    if not parallel:
        disk = disk_summary(data_dir, workers=workers, progress=progress)
    t_inst = time.perf_counter()
    message = None
    if instance is None and use_instance:
        instance, message = open_instance()
    t_open = time.perf_counter() - t_inst
    now = time.time() if now is None else now
    cache = os.path.join(data_dir, STATE_DIR, CACHE_FILE)
    if instance is not None:
        inst = instance_summary(
            instance, now=now, window_s=window_minutes * 60, last_n=last_n, cache_path=cache
        )
    else:
        inst = _no_instance(message or "instance not read (--no-instance)")
    inst["timings_s"]["instance_open"] = round(t_open, 4)
    if job is not None:
        disk = job.result()
    out = combine(data_dir, disk, inst, now=now, max_rps=max_rps if max_rps else max_rps_from_env())
    out["timings_s"]["total"] = round(time.perf_counter() - t0, 4)
    return out


# ----------------------------------------------------------------------------------------------
# Text rendering
# ----------------------------------------------------------------------------------------------
def format_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TB"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h:02d}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def _n(v: Any) -> str:
    return "?" if v is None else f"{v:,}"


def render_text(st: Mapping[str, Any]) -> str:
    m, ev, sy, dk = st["manifest"], st["events"], st["symbols"], st["disk"]
    inst, tp, api, er = st["instance"], st["throughput"], st["api"], st["errors"]
    lines = [f"smallcaps-ingest status  {st['data_dir']}  ({st['generated_at'][:19]}Z)"]
    if m["present"]:
        lines.append(f"  manifest    {_n(m['events'])} events, {_n(m['symbols'])} symbols")
        lines.append(
            f"  events      done {_n(ev['done'])} ({ev['pct_done']:.1f}%)  partial {_n(ev['partial'])}  "
            f"missing {_n(ev['missing'])}"
            + (f"  on disk, not in manifest {_n(ev['extra_on_disk'])}" if ev["extra_on_disk"] else "")
        )
        lines.append(
            f"  symbols     complete {_n(sy['complete'])} / {_n(sy['total'])}  "
            f"(started {_n(sy['started'])}, not started {_n(sy['not_started'])})"
        )
    else:
        if m.get("error"):
            lines.append(f"  manifest    unreadable ({m['path']}): {m['error']}")
        else:
            lines.append(f"  manifest    none yet ({m['path']}): materialize the manifest asset first")
        lines.append(
            f"  events      on disk: complete {_n(ev['complete_on_disk'])}, partial "
            f"{_n(ev['partial_on_disk'])} (no manifest to count missing ones)"
        )
        lines.append(f"  symbols     on disk {_n(sy['on_disk'])}")
    lines.append(
        f"  disk        {_n(dk['files'])} files, {format_bytes(dk['bytes'])}, "
        f"{_n(dk['tmp_orphans'])} tmp orphan(s)"
    )
    if inst["present"]:
        rate = tp["events_per_min"]
        eta = tp.get("eta")
        rate_s = f"{rate:,.1f} events/min" if rate is not None else "no rate"
        lines.append(
            f"  throughput  {rate_s} ({tp['basis']}, {tp['materializations']} materializations)"
            + (f"  ETA {eta}" if eta else "")
        )
        rps = api["requests_per_s"]
        util = api["utilization"]
        lines.append(
            "  API         "
            + (
                f"{rps:,.1f} req/s of {api['max_rps']:g} max ({util:.0%})"
                if rps is not None
                else f"no recent requests (max {api['max_rps']:g} req/s)"
            )
            + f"  429s {api['429s']}  budget wait {api['budget_wait_s']:.1f}s"
        )
        by = ", ".join(f"{k} {v}" for k, v in er["by_type"].items() if v) or "none"
        lines.append(f"  errors      {by}  |  failed runs {_n(er['failed_runs'])}")
        lines.append(
            f"  instance    {inst['dagster_home']}: {_n(inst['partitions'])} partitions, "
            f"{_n(inst['materialized_partitions'])} materialized, {_n(inst['materializations'])} "
            f"materializations, {_n(inst['runs_in_progress'])} run(s) in progress"
        )
    else:
        lines.append(f"  instance    {inst['message']} (no throughput, ETA, API usage or errors)")
    for note in st.get("notes", []):
        if note != inst["message"]:  # already on the instance line
            lines.append(f"  note: {note}")
    return "\n".join(lines)


class ProgressBar:
    """A one-line progress bar on a terminal stream (redrawn at most 10 times a second)."""

    def __init__(self, stream: Any, label: str = "scanning symbols", width: int = 30):
        self.stream, self.label, self.width = stream, label, width
        self._last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        t = time.monotonic()
        if done < total and t - self._last < 0.1:
            return
        self._last = t
        frac = done / total if total else 1.0
        fill = int(frac * self.width)
        self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {done}/{total}")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------
# Cleanup
# ----------------------------------------------------------------------------------------------
def _tmp_files_in(directory: str) -> list[str]:
    out = []
    try:
        with os.scandir(directory) as it:
            for e in it:
                if TMP_MARK in e.name and e.is_file(follow_symlinks=False):
                    out.append(e.path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return out


def find_tmp_orphans(data_dir: str) -> list[str]:
    """Every *.tmp* file under event_windows/ (all levels), at the top of the data dir (manifest and
    source tmp files), under _state/ and _reports/. Never a directory, never a symlink."""
    scan = scan_tree(data_dir)
    found = [p for p in scan.all_orphans() if os.path.isfile(p) and not os.path.islink(p)]
    for d in (data_dir, os.path.join(data_dir, STATE_DIR), os.path.join(data_dir, REPORTS_DIR)):
        found.extend(_tmp_files_in(d))
    return sorted(set(found))


def _removable(path: str) -> bool:
    """The last guard before unlink: a regular file, named as a temporary file, never a data file."""
    name = os.path.basename(path)
    if TMP_MARK not in name or name in (*FILES, SOURCE_FILE, MANIFEST_FILE):
        return False
    if name.startswith((EVENT_PREFIX, SYMBOL_PREFIX)):
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode)


def fail_dead_runs(instance: Any, exclude_run_id: str | None = None) -> list[str]:
    """Mark runs whose process died (kill -9, OOM, reboot) as failed and free their pool slots.

    An in-process CLI run that is killed stays STARTED forever and keeps its ``polygon_api`` slot,
    so after two such kills every later run waits on the pool. A run counts as dead when the
    process that wrote its RUN_START event on this host no longer exists.
    """
    import socket

    import dagster as dg

    dead: list[str] = []
    records = instance.get_run_records(
        dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING])
    )
    for r in records:
        run = r.dagster_run
        if run.run_id == exclude_run_id:
            continue
        starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_START)
        pid = starts[0].dagster_event.pid if starts and starts[0].dagster_event else None
        if not pid:
            continue
        host = (run.tags or {}).get("dagster/hostname")
        if host and host != socket.gethostname():
            continue  # another machine's run: its process cannot be checked from here
        try:
            os.kill(pid, 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # exists, owned by someone else
        instance.report_run_failed(run, message=f"process {pid} is gone (killed); marked failed")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        dead.append(run.run_id)
    return dead


def cleanup(
    data_dir: str,
    instance: Any,
    *,
    grace_minutes: float = 60.0,
    dry_run: bool = False,
    force: bool = False,
    now: float | None = None,
    exclude_run_id: str | None = None,
    instance_message: str | None = None,
) -> dict[str, Any]:
    """Remove *.tmp* orphans older than the grace period, only while no run writes the tree.

    Refuses (``refused=True``, nothing removed) when a run that materializes event_windows or the
    manifest is queued or in progress, or when there is no instance to ask, unless ``force``.
    """
    data_dir = os.path.abspath(data_dir)
    now = time.time() if now is None else now
    grace_s = grace_minutes * 60
    running: list[dict[str, Any]] = []
    dead: list[str] = []
    if instance is not None:
        if not dry_run:
            dead = fail_dead_runs(instance, exclude_run_id=exclude_run_id)
        running = runs_touching(
            instance, NOT_FINISHED, (ASSET, MANIFEST_ASSET), exclude_run_id=exclude_run_id
        )
    refused_msg = None
    if running and not force:
        refused_msg = (
            f"refusing to clean up: {len(running)} run(s) writing event_windows/manifest are queued or "
            f"in progress ({', '.join(r['run_id'][:8] + ' ' + r['status'] for r in running[:5])}); "
            "wait for them to finish, or pass --force"
        )
    elif instance is None and not force:
        refused_msg = (
            f"refusing to clean up: {instance_message or 'no Dagster instance'}, so runs in progress "
            "cannot be checked; set DAGSTER_HOME, or pass --force"
        )
    removed: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    errors: list[str] = []
    emptied: list[str] = []
    for path in find_tmp_orphans(data_dir):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        item = {"path": _rel(data_dir, path), "bytes": st.st_size, "age_s": round(now - st.st_mtime, 1)}
        if now - st.st_mtime < grace_s:
            kept.append(item)
            continue
        if refused_msg or dry_run:
            removed.append(item)  # what would be removed
            continue
        if not _removable(path):
            errors.append(f"{item['path']}: not a temporary file, left alone")
            continue
        try:
            os.unlink(path)
        except OSError as e:
            errors.append(f"{item['path']}: {e}")
            continue
        removed.append(item)
        parent = os.path.dirname(path)
        if os.path.basename(parent).startswith(EVENT_PREFIX):
            try:
                os.rmdir(parent)  # only succeeds when the event directory is now empty
                emptied.append(_rel(data_dir, parent))
            except OSError:
                pass
    acting_not = bool(dry_run or refused_msg)
    return {
        "data_dir": data_dir,
        "dry_run": dry_run,
        "refused": refused_msg is not None,
        "message": refused_msg,
        "grace_minutes": grace_minutes,
        "runs_in_progress": running,
        "dead_runs_failed": dead,
        "removed": [] if acting_not else removed,
        "would_remove": removed if acting_not else [],
        "removed_bytes": 0 if acting_not else sum(i["bytes"] for i in removed),
        "kept_young": kept,
        "removed_empty_event_dirs": emptied,
        "errors": errors,
    }


def render_cleanup(res: Mapping[str, Any]) -> str:
    lines = [
        f"marked {len(res['dead_runs_failed'])} dead run(s) failed and freed their pool slots: "
        + ", ".join(r[:8] for r in res["dead_runs_failed"])
    ] if res.get("dead_runs_failed") else []
    if res["refused"]:
        lines.append(res["message"])
    acted = not (res["dry_run"] or res["refused"])
    items = res["removed"] if acted else res["would_remove"]
    verb = "removed" if acted else "would remove"
    lines.append(
        f"{verb} {len(items)} tmp orphan(s) older than {res['grace_minutes']:g} min "
        f"({format_bytes(sum(i['bytes'] for i in items))})" + (" [dry run]" if res["dry_run"] else "")
    )
    lines += [f"  {verb}: {i['path']} ({i['bytes']} B, {format_duration(i['age_s'])} old)" for i in items]
    if res["kept_young"]:
        lines.append(
            f"kept {len(res['kept_young'])} younger than the grace period (a write may be in flight):"
        )
        lines += [f"  kept: {i['path']} ({format_duration(i['age_s'])} old)" for i in res["kept_young"]]
    if res["removed_empty_event_dirs"]:
        lines.append(f"removed {len(res['removed_empty_event_dirs'])} event directories left empty")
    lines += [f"error: {e}" for e in res["errors"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Reconcile
# ----------------------------------------------------------------------------------------------
def materialize_command(symbol: str, data_dir: str) -> str:
    return (
        f"SMALLCAPS_DATA_DIR={shlex.quote(data_dir)} dagster asset materialize -m smallcaps_ingest "
        f"--select {ASSET} --partition {shlex.quote(symbol)}"
    )


def reconcile(data_dir: str, instance: Any, *, fix: bool = False) -> dict[str, Any]:
    """Disk against the instance, per symbol partition of the manifest.

    * materialized but incomplete on disk (partial or missing manifest events): listed with the exact
      re-materialization command; ``fix`` wipes their materializations where the event log storage
      supports partition wipes (``instance.wipe_asset_partitions``), otherwise (SQLite and Postgres in
      Dagster 1.13 raise NotImplementedError) records a runless AssetObservation per partition with
      ``needs_rematerialization=True`` so the UI shows it on the partition;
    * complete on disk but not materialized: ``fix`` records a runless AssetMaterialization with
      ``reconciled=True`` (registering the partition first if the instance does not know it).
    Nothing on disk is touched.
    """
    import dagster as dg

    data_dir = os.path.abspath(data_dir)
    manifest = read_manifest_ids(data_dir)
    if manifest is None:
        raise StatusError(f"no manifest at {manifest_path(data_dir)}: materialize the manifest asset first")
    scan = scan_tree(data_dir)
    cov = coverage(manifest, scan)
    key = dg.AssetKey(ASSET)
    materialized = instance.get_materialized_partitions(key)
    registered = set(instance.get_dynamic_partitions(PARTITIONS))
    incomplete, unmaterialized = [], []
    for sym in sorted(manifest):
        c = cov[sym]
        row = {
            "symbol": sym,
            "events": c.events,
            "done": c.done,
            "partial": c.partial,
            "missing": c.missing,
            "files": c.files,
            "bytes": c.bytes,
            "registered": sym in registered,
        }
        if sym in materialized and c.done < c.events:
            incomplete.append(row)
        elif sym not in materialized and c.done == c.events:
            unmaterialized.append(row)
    not_in_manifest = sorted(set(materialized) - set(manifest))
    running = runs_touching(instance, NOT_FINISHED)
    res: dict[str, Any] = {
        "data_dir": data_dir,
        "symbols": len(manifest),
        "materialized_partitions": len(materialized),
        "materialized_incomplete": incomplete,
        "complete_not_materialized": unmaterialized,
        "materialized_not_in_manifest": not_in_manifest,
        "runs_in_progress": len(running),
        "commands": [materialize_command(r["symbol"], data_dir) for r in incomplete],
        "fixed": None,
    }
    if not fix:
        return res
    fixed: dict[str, Any] = {
        "recorded_materializations": [],
        "registered_partitions": [],
        "needs_rematerialization": [],
        "method": None,
    }
    new_parts = [r["symbol"] for r in unmaterialized if not r["registered"]]
    if new_parts:
        instance.add_dynamic_partitions(PARTITIONS, new_parts)
        fixed["registered_partitions"] = new_parts
    for r in unmaterialized:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=key,
                partition=r["symbol"],
                description="Recorded by smallcaps-ingest reconcile: every manifest event is complete on "
                "disk.",
                metadata={
                    "reconciled": True,
                    "events_total": r["events"],
                    "events_complete": r["done"],
                    "files": r["files"],
                    "bytes": r["bytes"],
                },
            )
        )
        fixed["recorded_materializations"].append(r["symbol"])
    if incomplete:
        syms = [r["symbol"] for r in incomplete]
        try:
            instance.wipe_asset_partitions(key, syms)
            fixed["method"] = "wiped"
        except NotImplementedError:
            fixed["method"] = "observation"
            for r in incomplete:
                instance.report_runless_asset_event(
                    dg.AssetObservation(
                        asset_key=key,
                        partition=r["symbol"],
                        description="smallcaps-ingest reconcile: materialized, but incomplete on disk; "
                        "re-materialize this partition.",
                        metadata={
                            "needs_rematerialization": True,
                            "events_total": r["events"],
                            "events_complete": r["done"],
                            "events_partial": r["partial"],
                            "events_missing": r["missing"],
                            "command": materialize_command(r["symbol"], data_dir),
                        },
                    )
                )
        fixed["needs_rematerialization"] = syms
    res["fixed"] = fixed
    return res


def render_reconcile(res: Mapping[str, Any]) -> str:
    lines = [
        f"reconcile {res['data_dir']}: {res['symbols']} manifest symbols, "
        f"{res['materialized_partitions']} materialized partitions"
    ]
    inc, unm = res["materialized_incomplete"], res["complete_not_materialized"]
    if not inc and not unm and not res["materialized_not_in_manifest"]:
        lines.append("disk and instance agree.")
    if inc:
        lines.append(f"{len(inc)} materialized but incomplete on disk:")
        lines += [
            f"  {r['symbol']}: {r['done']}/{r['events']} done, {r['partial']} partial, {r['missing']} missing"
            for r in inc
        ]
        lines.append("re-materialize with:")
        lines += [f"  {c}" for c in res["commands"]]
    if unm:
        lines.append(f"{len(unm)} complete on disk but not materialized:")
        lines += [
            f"  {r['symbol']}: {r['done']}/{r['events']} done"
            + ("" if r["registered"] else " (partition not registered)")
            for r in unm
        ]
        if res["fixed"] is None:
            lines.append("  (--fix records them as materialized, with reconciled=True)")
    if res["materialized_not_in_manifest"]:
        lines.append(
            f"{len(res['materialized_not_in_manifest'])} materialized partition(s) not in the manifest: "
            + ", ".join(res["materialized_not_in_manifest"][:20])
        )
    if res["runs_in_progress"]:
        lines.append(
            f"note: {res['runs_in_progress']} run(s) in progress; their partitions may still be filling"
        )
    fx = res["fixed"]
    if fx is not None:
        if fx["registered_partitions"]:
            lines.append(f"fixed: registered {len(fx['registered_partitions'])} partition(s)")
        if fx["recorded_materializations"]:
            lines.append(
                f"fixed: recorded {len(fx['recorded_materializations'])} runless materialization(s) "
                "(reconciled=True)"
            )
        if fx["needs_rematerialization"]:
            how = (
                "wiped their materializations"
                if fx["method"] == "wiped"
                else "recorded an AssetObservation needs_rematerialization=True on each "
                "(this event log storage cannot wipe partitions)"
            )
            lines.append(
                f"fixed: {len(fx['needs_rematerialization'])} incomplete partition(s): {how}; "
                "run the commands above to re-materialize"
            )
    return "\n".join(lines)
