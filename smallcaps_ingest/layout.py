"""The data directory's paths and file names, and the one scanner of its event tree.

    $SMALLCAPS_DATA_DIR/
      manifest.parquet                     the events to fetch (the manifest asset)
      _source.json                         which source filled the tree (real API or simulator)
      event_windows/symbol=SYM/event=EVENT_ID/{trades,quotes}.parquet
      compacted/symbol=SYM/...             a symbol's events, a file per kind and type (core/compact.py)
      _state/                              small state files (density, status' lifetime sums)
      _reports/                            ingestion_report.{parquet,png}
    and anywhere: NAME.tmp.PID.NS          a write in flight, or an orphan of an interrupted one

Everything that touches the tree (store, check, compact, read, preview, status, cleanup, reconcile,
report) takes its names from here and walks it with :func:`scan_tree` / :func:`scan_symbol_dir`.
Stdlib only, so ``status`` can import it without polars. The data directory may be an S3 URL
(``storage.py``): the path builders then return a ``UPath``, and the scanner lists objects by prefix
(one LIST per 1,000 keys) instead of directories; on S3 nothing is written as a temporary object, so
there is never a *tmp orphan*.

An event is *complete* when both files exist and *partial* when one does; an event directory holding
neither is *empty*. A *tmp orphan* is any name containing ``.tmp`` (what ``store.atomic_write_bytes``
writes before its rename).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallcaps_ingest import storage

WINDOWS_DIR = "event_windows"
SYMBOL_PREFIX = "symbol="
EVENT_PREFIX = "event="
FILES = ("trades.parquet", "quotes.parquet")
TMP_MARK = ".tmp"
SOURCE_FILE = "_source.json"
MANIFEST_FILE = "manifest.parquet"
STATE_DIR = "_state"
REPORTS_DIR = "_reports"
COMPACT_DIR = "compacted"
DENSITY_FILE = "density.json"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

PathLike = str | os.PathLike[str]
ProgressFn = Callable[[int, int], None]


def _safe(part: str, what: str) -> str:
    if not _SAFE.match(part) or ".." in part:
        raise ValueError(f"unsafe {what} for a path component: {part!r}")
    return part


def _base(data_dir: PathLike) -> Any:
    return storage.to_path(data_dir) if storage.is_remote(data_dir) else Path(data_dir)


def windows_root(data_dir: PathLike) -> Path:
    return _base(data_dir) / WINDOWS_DIR


def symbol_part(symbol: str) -> str:
    """A symbol's directory name (``symbol=S``), in the event tree and the compacted one."""
    return f"{SYMBOL_PREFIX}{_safe(symbol, 'symbol')}"


def symbol_dir(data_dir: PathLike, symbol: str) -> Path:
    return windows_root(data_dir) / symbol_part(symbol)


def event_dir(data_dir: PathLike, symbol: str, event_id: str) -> Path:
    return symbol_dir(data_dir, symbol) / f"{EVENT_PREFIX}{_safe(event_id, 'event_id')}"


def manifest_path(data_dir: PathLike) -> str:
    return storage.join(os.fspath(data_dir), MANIFEST_FILE)


def state_dir(data_dir: PathLike) -> Path:
    return _base(data_dir) / STATE_DIR


def reports_dir(data_dir: PathLike) -> Path:
    return _base(data_dir) / REPORTS_DIR


def compact_root(data_dir: PathLike) -> Path:
    return _base(data_dir) / COMPACT_DIR


def tmp_path(dest: Path) -> Path:
    """The temporary sibling a write of ``dest`` goes to first (unique per process and moment)."""
    return dest.with_name(f"{dest.name}{TMP_MARK}.{os.getpid()}.{time.monotonic_ns()}")


def is_tmp(name: str) -> bool:
    return TMP_MARK in name


@dataclass
class SymbolDisk:
    """One symbol directory: which events are complete or partial, and what else lies there."""

    complete: frozenset[str] = frozenset()
    partial: frozenset[str] = frozenset()
    orphans: tuple[str, ...] = ()  # absolute paths of *.tmp* entries
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


class _EventTally:
    """What the scan of one symbol directory accumulates."""

    def __init__(self, detail: bool) -> None:
        self.complete: set[str] = set()
        self.partial: set[str] = set()
        self.orphans: list[str] = []
        self.stats: dict[str, tuple[int, int, int, int]] | None = {} if detail else None
        self.empty = self.files = self.bytes = 0

    def event(self, path: str, eid: str, names: list[str]) -> None:
        found: dict[str, tuple[int, int]] = {}
        for f in names:
            if f in FILES:
                try:
                    st = os.stat(path + os.sep + f)
                except FileNotFoundError:  # removed while we looked
                    continue
                found[f] = (st.st_size, st.st_mtime_ns)
            elif TMP_MARK in f:
                self.orphans.append(path + os.sep + f)
        self.listed(eid, found)

    def listed(self, eid: str, found: dict[str, tuple[int, int]]) -> None:
        """One event's data files that exist: name -> (size, mtime ns)."""
        self.files += len(found)
        self.bytes += sum(size for size, _ in found.values())
        if len(found) == len(FILES):
            self.complete.add(eid)
            if self.stats is not None:
                t, q = found[FILES[0]], found[FILES[1]]
                self.stats[eid] = (*t, *q)
        elif found:
            self.partial.add(eid)
        else:
            self.empty += 1

    def result(self) -> SymbolDisk:
        return SymbolDisk(frozenset(self.complete), frozenset(self.partial), tuple(self.orphans),
                          self.empty, self.files, self.bytes, self.stats)


def scan_symbol_dir(root: str, detail: bool = False) -> SymbolDisk:
    """Scan one ``symbol=SYM`` directory: a listing per event directory, a ``stat`` per data file
    (its size); no file is opened. A missing directory is an empty symbol. On S3 (a URL): a LIST of
    the symbol's prefix."""
    if storage.is_remote(root):
        return _remote_symbols(root, detail, single=True).get("", SymbolDisk())
    tally = _EventTally(detail)
    try:
        top = os.scandir(root)
    except (FileNotFoundError, NotADirectoryError):
        return SymbolDisk()
    with top:
        for entry in top:
            name = entry.name
            if not name.startswith(EVENT_PREFIX):
                if TMP_MARK in name:
                    tally.orphans.append(entry.path)
                continue
            try:
                names = os.listdir(entry.path)
            except NotADirectoryError:
                if TMP_MARK in name:
                    tally.orphans.append(entry.path)
                continue
            except FileNotFoundError:  # removed while we looked
                continue
            tally.event(entry.path, name[len(EVENT_PREFIX):], names)
    return tally.result()


def list_symbol_dirs(data_dir: PathLike) -> tuple[list[tuple[str, str]], list[str]]:
    """(symbol, path) of every ``symbol=`` directory (sorted), and the *.tmp* files directly under
    ``event_windows/``."""
    dirs: list[tuple[str, str]] = []
    orphans: list[str] = []
    if storage.is_remote(data_dir):
        for url in storage.list_prefixes(str(windows_root(data_dir))):
            name = url.rsplit("/", 1)[-1]
            if name.startswith(SYMBOL_PREFIX):
                dirs.append((name[len(SYMBOL_PREFIX):], url))
        return sorted(dirs), []
    try:
        it = os.scandir(windows_root(data_dir))
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    with it:
        for e in it:
            if e.name.startswith(SYMBOL_PREFIX) and e.is_dir():
                dirs.append((e.name[len(SYMBOL_PREFIX):], e.path))
            elif TMP_MARK in e.name and e.is_file(follow_symlinks=False):
                orphans.append(e.path)
    dirs.sort()
    return dirs, orphans


def scan_tree(data_dir: PathLike, *, detail: bool = False, progress: ProgressFn | None = None) -> TreeScan:
    """Scan every symbol directory in this process; ``progress(done, total)`` after each symbol."""
    t0 = time.perf_counter()
    if storage.is_remote(data_dir):  # one listing of the whole tree: 1 LIST per 1,000 objects
        found = _remote_symbols(str(windows_root(data_dir)), detail, single=False)
        if progress is not None:
            progress(len(found), len(found))
        return TreeScan(dict(sorted(found.items())), (), time.perf_counter() - t0)
    dirs, root_orphans = list_symbol_dirs(data_dir)
    symbols: dict[str, SymbolDisk] = {}
    for i, (sym, path) in enumerate(dirs, 1):
        symbols[sym] = scan_symbol_dir(path, detail)
        if progress is not None:
            progress(i, len(dirs))
    return TreeScan(symbols, tuple(root_orphans), time.perf_counter() - t0)


def tmp_files_in(directory: PathLike) -> list[str]:
    """The *.tmp* regular files directly in ``directory`` (never a directory, never a symlink)."""
    out: list[str] = []
    if storage.is_remote(directory):  # nothing is ever written to S3 as a temporary object
        return out
    try:
        with os.scandir(directory) as it:
            for e in it:
                if TMP_MARK in e.name and e.is_file(follow_symlinks=False):
                    out.append(e.path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return out


def _remote_symbols(prefix: str, detail: bool, single: bool) -> dict[str, SymbolDisk]:
    """The symbols under an S3 prefix, from one listing: ``event_windows/`` (``single=False``:
    symbol -> disk) or one ``symbol=SYM/`` (``single=True``: its disk under the key "")."""
    events: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
    depth = 2 if single else 3  # the parts after the prefix: [symbol=S/]event=E/file
    for url, st in storage.find(prefix).items():
        parts = url[len(prefix.rstrip("/")) + 1:].split("/")
        if len(parts) != depth or not parts[-2].startswith(EVENT_PREFIX):
            continue
        sym = "" if single else parts[0]
        if not single and not sym.startswith(SYMBOL_PREFIX):
            continue
        per = events.setdefault(sym[len(SYMBOL_PREFIX):] if sym else "", {})
        found = per.setdefault(parts[-2][len(EVENT_PREFIX):], {})
        if parts[-1] in FILES:
            found[parts[-1]] = st[:2]
    out: dict[str, SymbolDisk] = {}
    for sym, per in events.items():
        tally = _EventTally(detail)
        for eid, found in per.items():
            tally.listed(eid, found)
        out[sym] = tally.result()
    return out
