"""Where the ingest stands: disk against the manifest, throughput from the instance, cleanup and reconcile.

Three sources, read cheaply:

* the tree ``event_windows/symbol=SYM/event=EVENT_ID/{trades,quotes}.parquet`` -- names and sizes only
  (no parquet is opened). ``status`` goes through the cache of :mod:`status_disk`: an event directory
  whose ctime is as cached is not listed again (one ``stat`` instead of a listing), while every data
  file is still ``stat``-ed for its size, so the answer is always the full scan's
  (:func:`full_disk_summary`, which tests compare it with);
* the manifest (``$SMALLCAPS_DATA_DIR/manifest.parquet``, two columns), read only when it or a
  symbol's listing changed (per-symbol counts are cached against its file key);
* the Dagster instance (``DAGSTER_HOME``): the "symbols" partitions, the ``event_windows``
  materializations (their metadata: events_written, requests, seconds, errors_by_type...) and the runs.
  On the default SQLite storage these are read straight from its files by :mod:`instance_sqlite`
  (``import dagster`` alone costs more than everything else status does); anything else goes
  through the Dagster API.

``status`` forks the disk scan (``--workers`` processes) before anything else, so it runs while the
parent reads the instance. The module imports nothing heavy at import time (stdlib only); Dagster and
polars are imported inside the functions that need them.

Definitions used throughout: an event is *done* when both files exist, *partial* when one does,
*missing* when the manifest has it and the disk has neither; *extra* events are on disk but not in the
manifest; a *tmp orphan* is a ``*.tmp*`` file left by an interrupted write.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import sqlite3
import stat
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from smallcaps_ingest.ops import status_disk as sd
from smallcaps_ingest.ops.instance_sqlite import SqliteInstanceView, Unsupported, open_view, value_of

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


# per symbol: (events in the manifest, done, partial, extra) and (files, bytes, complete, partial, empty)
CovRow = tuple[int, int, int, int]
DiskRow = tuple[int, int, int, int, int]


def _summary(
    data_dir: str,
    *,
    manifest_events: Mapping[str, int] | None,
    manifest_error: str | None,
    cov: Mapping[str, CovRow],
    disk: Mapping[str, DiskRow],
    orphans: Sequence[str],
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """The disk and manifest half of ``status`` from per-symbol figures (the ``--json`` schema)."""
    have = manifest_events is not None
    rows = list(cov.values())
    in_manifest = [r for r in rows if r[0]]
    out: dict[str, Any] = {
        "manifest": {
            "path": manifest_path(data_dir),
            "present": have,
            "error": manifest_error,
            "events": sum(manifest_events.values()) if manifest_events is not None else None,
            "symbols": len(manifest_events) if manifest_events is not None else None,
        },
        "events": {
            "total": sum(r[0] for r in rows) if have else None,
            "done": sum(r[1] for r in rows) if have else None,
            "partial": sum(r[2] for r in rows) if have else None,
            "missing": sum(r[0] - r[1] - r[2] for r in rows) if have else None,
            "extra_on_disk": sum(r[3] for r in rows),
            "complete_on_disk": sum(d[2] for d in disk.values()),
            "partial_on_disk": sum(d[3] for d in disk.values()),
            "empty_event_dirs": sum(d[4] for d in disk.values()),
        },
        "symbols": {
            "total": len(in_manifest) if have else None,
            "complete": sum(1 for r in in_manifest if r[1] == r[0]) if have else None,
            "started": sum(1 for r in in_manifest if 0 < r[1] < r[0]) if have else None,
            "not_started": sum(1 for r in in_manifest if r[1] == 0) if have else None,
            "on_disk": len(disk),
        },
        "disk": {
            "files": sum(d[0] for d in disk.values()),
            "bytes": sum(d[1] for d in disk.values()),
            "tmp_orphans": len(orphans),
            "tmp_orphan_examples": [_rel(data_dir, p) for p in sorted(orphans)[:EXAMPLES]],
        },
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
    ev = out["events"]
    if have:
        ev["pct_done"] = round(100.0 * ev["done"] / ev["total"], 2) if ev["total"] else 100.0
    return out


def full_disk_summary(
    data_dir: str, *, workers: int = 1, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """The disk and manifest half of ``status`` by a full scan, no cache: the reference the cached
    :func:`disk_summary` must always agree with."""
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
    return _summary(
        data_dir,
        manifest_events={s: len(v) for s, v in manifest.items()} if manifest is not None else None,
        manifest_error=manifest_error,
        cov={s: (c.events, c.done, c.partial, c.extra) for s, c in cov.items()},
        disk={
            s: (d.files, d.bytes, len(d.complete), len(d.partial), d.empty_dirs)
            for s, d in scan.symbols.items()
        },
        orphans=scan.all_orphans(),
        timings={"manifest": t_manifest, "scan": scan.seconds, "compare": time.perf_counter() - t1},
    )


class ManifestIds:
    """symbol -> manifest event ids; from the ids cache, a symbol's ids are split only when asked for
    (status needs the ids of the symbols whose listing changed, not all 572,850)."""

    def __init__(
        self, sets: Mapping[str, frozenset[str]] | None = None, joined: Mapping[str, str] | None = None
    ):
        self._sets: dict[str, frozenset[str]] = dict(sets or {})
        self._joined = joined or {}

    def get(self, sym: str) -> frozenset[str]:
        got = self._sets.get(sym)
        if got is None:
            j = self._joined.get(sym)
            got = frozenset(j.split("\0")) if j is not None else frozenset()
            self._sets[sym] = got
        return got

    def counts(self) -> dict[str, int]:
        if self._joined:
            return {s: j.count("\0") + 1 for s, j in self._joined.items()}
        return {s: len(v) for s, v in self._sets.items()}


def _joinable(manifest: Mapping[Any, frozenset[Any]]) -> bool:
    """Only non-empty string ids without NUL round-trip through the NUL-joined ids cache."""
    return all(
        isinstance(s, str) and v and all(isinstance(i, str) and i and "\0" not in i for i in v)
        for s, v in manifest.items()
    )


def _manifest_ids_cached(data_dir: str, key: Any) -> ManifestIds | None:
    """read_manifest_ids through ``_state/status_manifest.cache``, keyed by the manifest's file key
    (None: neither read nor write the cache)."""
    path = os.path.join(data_dir, STATE_DIR, sd.MANIFEST_CACHE)
    root = manifest_path(data_dir)
    if key is not None:
        data = sd.load(path, root)
        ids = data.get("ids") if data is not None and data.get("key") == key else None
        if isinstance(ids, dict) and all(isinstance(j, str) and j for j in ids.values()):
            return ManifestIds(joined=ids)
    manifest = read_manifest_ids(data_dir)
    if manifest is None:
        return None
    if key is not None and _joinable(manifest):
        sd.save(path, root, {"key": key, "ids": {s: "\0".join(sorted(v)) for s, v in manifest.items()}})
    return ManifestIds(sets=manifest)


class DiskScan:
    """The disk half of ``status`` with the cache of :mod:`status_disk`, started now, read by finish().

    ``fork``: every share of the scan runs in a forked worker, so the caller can do other work (the
    instance queries) meanwhile; otherwise share 0 runs in this process inside finish().
    """

    def __init__(
        self,
        data_dir: str,
        *,
        workers: int = 1,
        progress: ProgressFn | None = None,
        cache: bool = True,
        fork: bool = False,
    ):
        self.t0 = time.perf_counter()
        self.data_dir = os.path.abspath(data_dir)
        self.root = os.path.join(self.data_dir, WINDOWS_DIR)
        self.cut = sd.racy_cut()
        self.use_cache = cache
        self.cache_path = os.path.join(self.data_dir, STATE_DIR, sd.DISK_CACHE)
        self.cache = (sd.load(self.cache_path, self.root) or {}) if cache else {}
        syms = self.cache.get("symbols")
        self.cached: dict[str, sd.Entry] = syms if isinstance(syms, dict) else {}
        self.dirs, self.root_orphans = list_symbol_dirs(self.data_dir)
        w = max(1, min(workers, len(self.dirs) or 1))
        slices = [self.dirs[i::w] for i in range(w)]
        n = len(self.dirs)
        self.progress, self.scale = progress, w
        self.inline = None if fork else slices[0]
        self.jobs = [
            fork_call(sd.scan_slice, sl, self.cached, self.cut, progress if i == 0 else None, w, n)
            for i, sl in enumerate(slices)
            if fork or i > 0
        ]

    def _manifest(self) -> tuple[Any, Mapping[str, int] | None, ManifestIds | None, str | None]:
        """(file key, symbol -> events, ids if they had to be read, error) of the manifest."""
        path = manifest_path(self.data_dir)
        if not os.path.isfile(path):
            return None, None, None, None
        key = sd.file_key(path, self.cut)
        cached = self.cache.get("manifest")
        if (
            key is not None
            and isinstance(cached, tuple)
            and len(cached) == 2
            and cached[0] == key
            and isinstance(cached[1], dict)
            and all(isinstance(v, int) for v in cached[1].values())
        ):
            return key, cached[1], None, None
        try:
            ids = _manifest_ids_cached(self.data_dir, key if self.use_cache else None)
        except Exception as e:  # noqa: BLE001 - reported; status goes on with the disk alone
            return None, None, None, f"{type(e).__name__}: {e}"
        if ids is None:
            return None, None, None, None
        return key, ids.counts(), ids, None

    def finish(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        key, events, ids, error = self._manifest()  # overlaps with the forked workers
        t_manifest = time.perf_counter() - t0
        results: dict[str, sd.SymbolResult] = {}
        for j in self.jobs:
            results.update(j.result())
        if self.inline is not None:
            results.update(
                sd.scan_slice(self.inline, self.cached, self.cut, self.progress, self.scale, len(self.dirs))
            )
        t_scan = time.perf_counter() - self.t0
        t1 = time.perf_counter()
        old_cov = self.cache.get("coverage")
        cov_ok = (
            key is not None
            and isinstance(old_cov, tuple)
            and len(old_cov) == 2
            and old_cov[0] == key
            and isinstance(old_cov[1], dict)
        )
        cached_cov: Mapping[str, Any] = old_cov[1] if cov_ok else {}
        entries: dict[str, sd.Entry] = {}
        disk: dict[str, DiskRow] = {}
        orphans = list(self.root_orphans)
        same: set[str] = set()
        dirty = set(self.cached) != {s for s, _ in self.dirs}
        for sym, _ in self.dirs:
            files, size, n_complete, n_partial, n_empty, orph, entry, unchanged = results[sym]
            if entry is None:
                entry = self.cached[sym]
            else:
                dirty = True
            entries[sym] = entry
            disk[sym] = (files, size, n_complete, n_partial, n_empty)
            orphans.extend(orph)
            if unchanged:
                same.add(sym)
        cov: dict[str, CovRow] = {}
        new_cov: dict[str, tuple[int, int, int]] = {}
        if events is not None:
            try:
                for sym, entry in entries.items():
                    c = cached_cov.get(sym) if sym in same else None
                    if not (isinstance(c, tuple) and len(c) == 3 and all(isinstance(x, int) for x in c)):
                        if ids is None:  # only now, and only when a symbol changed
                            ids = _manifest_ids_cached(self.data_dir, key if self.use_cache else None)
                            if ids is None:
                                raise FileNotFoundError(manifest_path(self.data_dir))
                        c = sd.entry_coverage(entry, ids.get(sym))
                    new_cov[sym] = c
                    cov[sym] = (events.get(sym, 0), *c)
                for sym, n in events.items():
                    if sym not in cov:
                        cov[sym] = (n, 0, 0, 0)
            except Exception as e:  # noqa: BLE001 - the manifest changed under us and cannot be read
                events, key, new_cov = None, None, {}
                error = None if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
        if events is None:
            cov = {s: (0, 0, 0, d[2] + d[3]) for s, d in disk.items()}
        cov = dict(sorted(cov.items()))
        manifest_entry = (key, dict(events)) if key is not None and events is not None else None
        coverage_entry = (key, new_cov) if manifest_entry is not None else None
        if manifest_entry != self.cache.get("manifest") or coverage_entry != self.cache.get("coverage"):
            dirty = True
        if self.use_cache and dirty:
            sd.save(
                self.cache_path,
                self.root,
                {"symbols": entries, "manifest": manifest_entry, "coverage": coverage_entry},
            )
        return _summary(
            self.data_dir,
            manifest_events=events,
            manifest_error=error,
            cov=cov,
            disk=disk,
            orphans=orphans,
            timings={"manifest": t_manifest, "scan": t_scan, "compare": time.perf_counter() - t1},
        )


def disk_summary(
    data_dir: str, *, workers: int = 1, progress: ProgressFn | None = None, cache: bool = True
) -> dict[str, Any]:
    """The disk and manifest half of ``status`` (no Dagster): plain JSON-able values.

    ``cache``: reuse (and refresh) ``_state/status_disk.cache``; the answer is the same either way.
    """
    return DiskScan(data_dir, workers=workers, progress=progress, cache=cache).finish()


# ----------------------------------------------------------------------------------------------
# The Dagster instance
# ----------------------------------------------------------------------------------------------
def open_instance(fast: bool = False) -> tuple[Any | None, str | None]:
    """(DagsterInstance, None), or (None, why there is none) -- never raises.

    ``fast``: for reads only -- a :class:`SqliteInstanceView` of the default SQLite instance when
    ``instance_sqlite.open_view`` vouches for it (no ``import dagster``), else the Dagster instance.
    """
    home = os.environ.get("DAGSTER_HOME", "").strip()
    if not home:
        return None, "no Dagster instance: DAGSTER_HOME is not set"
    if not os.path.isdir(home):
        return None, f"no Dagster instance: DAGSTER_HOME={home} is not a directory"
    if fast:
        view = open_view()
        if view is not None:
            return view, None
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


def _point(
    ts: float, partition: str | None, run_id: str, storage_id: int, value: Callable[[str], Any]
) -> MatPoint:
    """A MatPoint from one materialization's fields; ``value(key)`` is its metadata's ``.value``."""
    errs = value("errors_by_type")
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

    def num(key: str, kind: type = int) -> Any:
        v = value(key)
        try:
            return kind(v) if v is not None else kind(0)
        except (TypeError, ValueError):
            return kind(0)

    return MatPoint(
        ts=float(ts),
        partition=partition,
        run_id=run_id or "",
        storage_id=int(storage_id),
        seconds=num("seconds", float),
        written=num("events_written"),
        requests=num("requests"),
        throttled=num("429s"),
        budget_wait_s=num("budget_wait_s", float),
        errors=errors,
        reconciled=bool(value("reconciled")),
    )


def mat_point(record: Any) -> MatPoint:
    """From a Dagster EventLogRecord of an AssetMaterialization."""
    mat = record.asset_materialization
    md = dict(mat.metadata) if mat is not None else {}

    def value(key: str) -> Any:
        v = md.get(key)
        return getattr(v, "value", v)

    return _point(record.timestamp, record.partition_key, record.run_id, record.storage_id, value)


def _view_point(row: tuple[int, float, str | None, str, dict[str, Any]]) -> MatPoint:
    storage_id, ts, partition, run_id, md = row
    return _point(ts, partition, run_id, storage_id, lambda key: value_of(md, key))


def fetch_points(
    instance: Any,
    *,
    after_timestamp: float | None = None,
    after_storage_id: int | None = None,
    limit: int | None = None,
    ascending: bool = False,
    cap: int = RECENT_CAP,
) -> list[MatPoint]:
    """The event_windows materializations, newest first (or oldest first), at most ``limit``/``cap``."""
    if isinstance(instance, SqliteInstanceView):
        want = min(limit, cap) if limit is not None else cap
        rows = instance.materializations(
            ASSET,
            after_timestamp=after_timestamp,
            after_storage_id=after_storage_id,
            limit=want,
            ascending=ascending,
        )
        return [_view_point(r) for r in rows]
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
    if isinstance(instance, SqliteInstanceView):
        return instance.asset_marks(ASSET)
    import dagster as dg

    recs = instance.get_asset_records([dg.AssetKey(ASSET)])
    if not recs:
        return False, None, None
    entry = recs[0].asset_entry
    details = entry.asset_details
    wipe = getattr(details, "last_wipe_timestamp", None) if details is not None else None
    last = entry.last_materialization_record
    return True, wipe, (last.storage_id if last is not None else None)


def _lifetime_entry_ok(entry: Mapping[str, Any]) -> bool:
    """A cached lifetime entry of the right shape (anything else is recomputed, never trusted)."""
    counts = ("materializations", "events_written", "requests", "429s", "reconciled")
    errors = entry.get("errors_by_type")
    after = entry.get("after_storage_id")
    return (
        all(type(entry.get(k)) is int for k in counts)
        and (after is None or type(after) is int)
        and isinstance(errors, dict)
        and all(isinstance(k, str) and type(v) is int for k, v in errors.items())
    )


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
        or not _lifetime_entry_ok(entry)
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
    instance: Any,
    statuses: Sequence[str],
    asset_names: Iterable[str] = (ASSET,),
    exclude_run_id: str | None = None,
) -> list[dict[str, Any]]:
    names = tuple(asset_names)
    if isinstance(instance, SqliteInstanceView):
        wanted = set(names)
        return [
            {k: r[k] for k in ("run_id", "job_name", "status", "created")}
            for r in instance.run_records(statuses)
            if r["run_id"] != exclude_run_id
            and _touches(r["asset_selection"], r["has_check_selection"], r["job_name"], wanted)
        ]
    import dagster as dg

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
    """The Dagster half of ``status`` (through the Dagster API, or a SqliteInstanceView of it)."""
    t0 = time.perf_counter()
    partitions = list(instance.get_dynamic_partitions(PARTITIONS))
    if isinstance(instance, SqliteInstanceView):
        materialized = instance.get_materialized_partitions(ASSET)
    else:
        import dagster as dg

        materialized = instance.get_materialized_partitions(dg.AssetKey(ASSET))
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
    fast_instance: bool = True,
    disk_cache: bool = True,
) -> dict[str, Any]:
    """Everything ``status`` reports. ``instance=None`` opens the one at DAGSTER_HOME (if any).

    ``parallel=True`` forks the disk scan first, so it runs while this process reads the instance
    (the CLI path). ``fast_instance``: read a default SQLite instance directly (instance_sqlite), not
    through ``import dagster``; anything it does not mirror exactly falls back to Dagster.
    ``disk_cache``: use ``_state/status_disk.cache`` (same answer, less work).
    """
    t0 = time.perf_counter()
    data_dir = os.path.abspath(data_dir)
    scan = DiskScan(data_dir, workers=workers, progress=progress, cache=disk_cache, fork=parallel)
    disk = None if parallel else scan.finish()
    t_inst = time.perf_counter()
    message = None
    if instance is None and use_instance:
        instance, message = open_instance(fast=fast_instance)
    t_open = time.perf_counter() - t_inst
    now = time.time() if now is None else now
    cache = os.path.join(data_dir, STATE_DIR, CACHE_FILE)
    window_s = window_minutes * 60
    inst: dict[str, Any] | None = None
    if isinstance(instance, SqliteInstanceView):
        view, instance = instance, None
        try:
            inst = instance_summary(view, now=now, window_s=window_s, last_n=last_n, cache_path=cache)
        except (Unsupported, sqlite3.Error):  # not something the view mirrors: ask Dagster
            t = time.perf_counter()
            instance, message = open_instance()
            t_open += time.perf_counter() - t
        finally:
            view.close()
    if inst is None:
        if instance is not None:
            inst = instance_summary(instance, now=now, window_s=window_s, last_n=last_n, cache_path=cache)
        else:
            inst = _no_instance(message or "instance not read (--no-instance)")
    inst["timings_s"]["instance_open"] = round(t_open, 4)
    if disk is None:
        disk = scan.finish()
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

    def close(self, always: bool = False) -> None:
        """Clear the bar; ``always`` when a forked worker may have drawn it (this copy cannot know)."""
        if self.drawn or always:
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
    lines = (
        [
            f"marked {len(res['dead_runs_failed'])} dead run(s) failed and freed their pool slots: "
            + ", ".join(r[:8] for r in res["dead_runs_failed"])
        ]
        if res.get("dead_runs_failed")
        else []
    )
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
      ``reconciled=True`` (registering the partition first if the instance does not know it);
    * *foreign* event directories: ones holding data files under a symbol directory that are no
      manifest event of that symbol (named by an earlier version of the event ids, by an events file
      since changed, or under a symbol no longer in the manifest). Reported, never deleted.
    Nothing on disk is touched, with ``fix`` or without.
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
    foreign = foreign_events(manifest, scan)
    running = runs_touching(instance, NOT_FINISHED)
    res: dict[str, Any] = {
        "data_dir": data_dir,
        "symbols": len(manifest),
        "materialized_partitions": len(materialized),
        "materialized_incomplete": incomplete,
        "complete_not_materialized": unmaterialized,
        "materialized_not_in_manifest": not_in_manifest,
        "foreign_events": foreign,
        "foreign_events_total": sum(f["count"] for f in foreign),
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
    if unmaterialized:
        # the asset's own provenance (code version, input data versions, logical data version), so a
        # reconciled partition is as fresh as one the asset materialized, not stale in the UI
        from smallcaps_ingest.pipeline.assets import EVENT_WINDOWS_CODE_VERSION, _provenance_tags
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
                tags=_provenance_tags(instance, r["symbol"], EVENT_WINDOWS_CODE_VERSION),
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


def foreign_events(
    manifest: Mapping[str, frozenset[str]], scan: TreeScan, examples: int = 3
) -> list[dict[str, Any]]:
    """Per symbol on disk, its event directories holding data that are no manifest event of it:
    count, complete, partial and the first ``examples`` names (sorted). Symbols without any: left out."""
    out: list[dict[str, Any]] = []
    for sym, disk in sorted(scan.symbols.items()):
        want = manifest.get(sym, frozenset())
        complete, partial = disk.complete - want, disk.partial - want
        if complete or partial:
            out.append(
                {
                    "symbol": sym,
                    "count": len(complete) + len(partial),
                    "complete": len(complete),
                    "partial": len(partial),
                    "in_manifest": sym in manifest,
                    "examples": sorted(complete | partial)[:examples],
                }
            )
    return out


def render_reconcile(res: Mapping[str, Any]) -> str:
    lines = [
        f"reconcile {res['data_dir']}: {res['symbols']} manifest symbols, "
        f"{res['materialized_partitions']} materialized partitions"
    ]
    inc, unm = res["materialized_incomplete"], res["complete_not_materialized"]
    foreign = res["foreign_events"]
    if not inc and not unm and not res["materialized_not_in_manifest"] and not foreign:
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
    if foreign:
        lines.append(
            f"foreign event directories: {res['foreign_events_total']} under {len(foreign)} symbol(s), no "
            "manifest event (e.g. named by an earlier version's event ids); left in place, never deleted:"
        )
        lines += [
            f"  {f['symbol']}: {f['count']} ({f['complete']} complete, {f['partial']} partial"
            + ("" if f["in_manifest"] else ", symbol not in the manifest")
            + "), e.g. "
            + ", ".join(f["examples"])
            for f in foreign[:20]
        ]
        if len(foreign) > 20:
            lines.append(f"  ... and {len(foreign) - 20} more symbol(s) (--json lists them all)")
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
