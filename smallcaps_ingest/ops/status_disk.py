"""The disk scan of ``status``, with a cache that can save work but never change an answer.

Stdlib only (it runs in forked children before anything heavy is imported).

What a full scan does per event directory is a listing (five syscalls here) and a ``stat`` per data
file (its size). The cache in ``$SMALLCAPS_DATA_DIR/_state/status_disk.cache`` remembers, per event
directory, its ``st_ctime_ns``, what its listing held (trades? quotes? which ``*.tmp*`` names) and the
data files' sizes. A directory's ctime changes whenever an entry is added, removed or renamed in it
(and on chmod, utime...) and cannot be set back by a user, so an unchanged (ctime, inode) means an
unchanged listing (the inode catches a directory swapped for another one made in the same clock
tick): the listing and the data files' ``stat`` calls are skipped, one ``stat`` replaces them. The
same holds one level up: an unchanged ``symbol=`` directory reuses its cached list of names.

Sizes: every writer of this tree (``store.atomic_write_parquet``, and any tool that writes a file
beside and renames it) changes the event directory, so its files are measured again. A file
rewritten *in place* (opened for writing where it stands) changes no directory: its new size shows
in ``status --no-cache`` or once its directory changes, not in a warm run. That is the price of the
target: with three ``stat`` calls per event a warm ``status`` on 572,850 events took 1.54 s, with
one it takes 0.74 s (benchmarks/status_bench.py). Event counts, partial events and orphans stay exact.

Racy timestamps: a change made in the same clock tick as the ctime we recorded would leave it
unchanged, so a ctime less than ``RACY_NS`` old when read is never trusted later (the entry is stored
as 0 and listed again next time). The file is written atomically (temporary file, ``os.replace``)
with a magic, a version and a CRC; a file that fails any check, or belongs to another tree, is
ignored; a read-only data dir just means no cache.

Coverage against the manifest is cached too, per symbol, keyed by the manifest file's
(inode, size, mtime, ctime) and the symbol's listing: a symbol whose listing did not change keeps its
done/partial/extra counts, and the manifest itself is read only when it changed or a symbol changed.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import stat as stat_mod
import time
import zlib
from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# the same as store.FILES / store.TMP_MARK (a test pins them)
FILES = ("trades.parquet", "quotes.parquet")
TMP_MARK = ".tmp"
EVENT_PREFIX = "event="
SYMBOL_PREFIX = "symbol="
WINDOWS_DIR = "event_windows"
STATE_DIR = "_state"
DISK_CACHE = "status_disk.cache"
MANIFEST_CACHE = "status_manifest.cache"
CACHE_MAGIC = "smallcaps_ingest.ops.status_disk"
CACHE_VERSION = 3  # 3: data file sizes cached per event directory
INO_MASK = (1 << 63) - 1  # inodes are unsigned 64-bit; the cache keeps them in signed slots
RACY_NS = 2_000_000_000  # a ctime younger than this when read is not trusted later

# per-entry flags of a symbol directory's listing
F_TRADES, F_QUOTES, F_ORPHANS, F_OTHER, F_GONE = 1, 2, 4, 8, 16

# (symbol dir ctime or 0, names joined by NUL, (ctime, inode) per name as array('q') bytes, flags
# bytes, tmp names inside event directories, symbol dir inode, (trades size, quotes size) per name as
# array('q') bytes). A ctime of 0 is never trusted.
Entry = tuple[int, str, bytes, bytes, dict[str, tuple[str, ...]], int, bytes]
# files, bytes, complete, partial, empty event dirs, tmp orphan paths, new entry (None: unchanged),
# whether the listing (names and flags) is the cached one
SymbolResult = tuple[int, int, int, int, int, list[str], Entry | None, bool]
ProgressFn = Callable[[int, int], None]
_STAT_DIR_FD = os.stat in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")


def _valid_entry(e: Any) -> bool:
    return (
        isinstance(e, tuple)
        and len(e) == 7
        and isinstance(e[0], int)
        and isinstance(e[5], int)
        and isinstance(e[1], str)
        and isinstance(e[2], bytes)
        and isinstance(e[3], bytes)
        and isinstance(e[4], dict)
        and len(e[2]) == 16 * len(e[3])
        and isinstance(e[6], bytes)
        and len(e[6]) == len(e[2])
        and (len(e[3]) == (e[1].count("\0") + 1 if e[1] else 0))
        and all(isinstance(v, tuple) and all(isinstance(f, str) for f in v) for v in e[4].values())
    )


def _unchanged(path: str, old: Entry, names: list[str]) -> SymbolResult | None:
    """The hot path: a symbol directory whose listing and every event directory's ctime are as
    cached. One stat per event directory (the sizes are the cached ones, see the module's
    docstring); None at the first difference (scan_symbol then looks closer)."""
    old_keys = array("q")
    old_keys.frombytes(old[2])
    old_flags, old_orphans = old[3], old[4]
    stat = os.stat
    files = size = complete = partial = empty_dirs = 0
    orphans: list[str] = []
    pairs = iter(old_keys)  # zip(pairs, pairs) walks the (ctime, inode) pairs
    sizes = array("q")
    sizes.frombytes(old[6])
    two = iter(sizes)  # and (trades size, quotes size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, fl, c, ino, t_size, q_size in zip(names, old_flags, pairs, pairs, two, two, strict=True):
            if fl & F_OTHER:
                if TMP_MARK in name:
                    orphans.append(path + "/" + name)
                continue
            if not c or fl & F_GONE:
                return None
            s = stat(name, dir_fd=fd)
            if s.st_ctime_ns != c or s.st_ino & INO_MASK != ino or s.st_mode & 0o170000 != 0o040000:
                return None
            if fl & F_TRADES:
                size += t_size
                files += 1
            if fl & F_QUOTES:
                size += q_size
                files += 1
            both = fl & 3
            if both == 3:
                complete += 1
            elif both:
                partial += 1
            else:
                empty_dirs += 1
            if fl & F_ORPHANS:
                base = path + "/" + name + "/"
                orphans.extend(base + f for f in old_orphans.get(name, ()))
    except (FileNotFoundError, NotADirectoryError):
        return None
    finally:
        os.close(fd)
    return (files, size, complete, partial, empty_dirs, orphans, None, True)


def scan_symbol(path: str, old: Entry | None, cut: int) -> tuple[SymbolResult, Entry]:
    """One ``symbol=`` directory, reusing ``old`` where ctimes prove it current.

    Same verdicts as ``status.scan_symbol_dir`` (tests check it on every kind of change).
    """
    empty: Entry = (0, "", b"", b"", {}, 0, b"")
    if old is not None and not _valid_entry(old):
        old = None
    try:
        s0 = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return (0, 0, 0, 0, 0, [], empty, old == empty), empty
    skey, sino = s0.st_ctime_ns, s0.st_ino & INO_MASK
    if old is not None and old[0] and old[0] == skey and old[5] == sino:
        names = old[1].split("\0") if old[1] else []
        same_listing = True
        if _STAT_DIR_FD and os.sep == "/":
            try:
                hit = _unchanged(path, old, names)
            except (FileNotFoundError, NotADirectoryError):
                hit = None
            if hit is not None:
                return hit, old
    else:
        try:
            names = os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return (0, 0, 0, 0, 0, [], empty, old == empty), empty
        same_listing = False
    old_keys = array("q")
    old_sizes = array("q")
    old_flags = b""
    old_orphans: Mapping[str, tuple[str, ...]] = {}
    index: dict[str, int] | None = None
    if old is not None:
        old_keys.frombytes(old[2])
        old_sizes.frombytes(old[6])
        old_flags, old_orphans = old[3], old[4]
        if not same_listing:
            index = {n: i for i, n in enumerate(old[1].split("\0"))} if old[1] else {}

    trades_name, quotes_name = FILES
    sep = os.sep
    keys = array("q")
    sizes = array("q")
    flags = bytearray()
    orph_map: dict[str, tuple[str, ...]] = {}
    orphans: list[str] = []
    files = size = complete = partial = empty_dirs = 0
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if _STAT_DIR_FD else None
    prefix = "" if fd is not None else path + sep

    def st(rel: str) -> os.stat_result:
        return os.stat(rel, dir_fd=fd) if fd is not None else os.stat(prefix + rel)

    try:
        for i, name in enumerate(names):
            if not name.startswith(EVENT_PREFIX):
                keys.extend((0, 0))
                sizes.extend((0, 0))
                flags.append(F_OTHER)
                if TMP_MARK in name:
                    orphans.append(path + sep + name)
                continue
            try:
                s = st(name)
            except FileNotFoundError:  # gone, or a dangling symlink: a full scan skips it too
                keys.extend((0, 0))
                sizes.extend((0, 0))
                flags.append(F_GONE)
                continue
            if not stat_mod.S_ISDIR(s.st_mode):
                keys.extend((0, 0))
                sizes.extend((0, 0))
                flags.append(F_OTHER)
                if TMP_MARK in name:
                    orphans.append(path + sep + name)
                continue
            c, ino = s.st_ctime_ns, s.st_ino & INO_MASK
            j = i if same_listing else (index.get(name) if index is not None else None)
            inner: tuple[str, ...] = ()
            if (
                j is not None
                and c
                and old_keys[2 * j] == c
                and old_keys[2 * j + 1] == ino
                and not old_flags[j] & (F_OTHER | F_GONE)
            ):
                fl = old_flags[j]
                if fl & F_ORPHANS:
                    inner = old_orphans.get(name, ())
                t_size, q_size = old_sizes[2 * j], old_sizes[2 * j + 1]  # as in _unchanged
                listed = False
            else:
                listed = True
                try:
                    listing = os.listdir(path + sep + name)
                except FileNotFoundError:
                    keys.extend((0, 0))
                    sizes.extend((0, 0))
                    flags.append(F_GONE)
                    continue
                except NotADirectoryError:
                    keys.extend((0, 0))
                    sizes.extend((0, 0))
                    flags.append(F_OTHER)
                    if TMP_MARK in name:
                        orphans.append(path + sep + name)
                    continue
                fl = 0
                tmp = []
                for f in listing:
                    if f == trades_name:
                        fl |= F_TRADES
                    elif f == quotes_name:
                        fl |= F_QUOTES
                    elif TMP_MARK in f:
                        tmp.append(f)
                if tmp:
                    fl |= F_ORPHANS
                    inner = tuple(tmp)
            if listed:
                t_size = q_size = 0
                if fl & F_TRADES:
                    try:
                        t_size = st(name + sep + trades_name).st_size
                    except FileNotFoundError:  # removed after the listing: a full scan skips it too
                        fl &= ~F_TRADES
                        c = 0
                if fl & F_QUOTES:
                    try:
                        q_size = st(name + sep + quotes_name).st_size
                    except FileNotFoundError:
                        fl &= ~F_QUOTES
                        c = 0
            if fl & F_TRADES:
                size += t_size
                files += 1
            if fl & F_QUOTES:
                size += q_size
                files += 1
            sizes.append(t_size)
            sizes.append(q_size)
            if c and c < cut:
                keys.append(c)
                keys.append(ino)
            else:
                keys.extend((0, 0))
            flags.append(fl)
            if inner:
                orph_map[name] = inner
                base = path + sep + name + sep
                orphans.extend(base + f for f in inner)
            both = fl & (F_TRADES | F_QUOTES)
            if both == F_TRADES | F_QUOTES:
                complete += 1
            elif both:
                partial += 1
            else:
                empty_dirs += 1
    finally:
        if fd is not None:
            os.close(fd)
    joined = "\0".join(names)
    trusted = skey < cut
    new: Entry = (
        skey if trusted else 0,
        joined,
        keys.tobytes(),
        bytes(flags),
        orph_map,
        sino if trusted else 0,
        sizes.tobytes(),
    )
    same = old is not None and old[1] == joined and old[3] == new[3]
    return (files, size, complete, partial, empty_dirs, orphans, None if new == old else new, same), new


def scan_slice(
    dirs: Sequence[tuple[str, str]],
    cached: Mapping[str, Entry],
    cut: int,
    progress: ProgressFn | None = None,
    scale: int = 1,
    total: int | None = None,
) -> dict[str, SymbolResult]:
    """scan_symbol over some symbols (a forked worker's share). Entries come back only if changed."""
    out: dict[str, SymbolResult] = {}
    n = total if total is not None else len(dirs)
    for i, (sym, path) in enumerate(dirs, 1):
        out[sym] = scan_symbol(path, cached.get(sym), cut)[0]
        if progress is not None:
            progress(min(i * scale, n), n)
    return out


def entry_coverage(entry: Entry, want: frozenset[str]) -> tuple[int, int, int]:
    """(done, partial, extra) of one symbol entry against its manifest event ids (no sets built)."""
    if not entry[1]:
        return 0, 0, 0
    n = len(EVENT_PREFIX)
    done = partial = extra = 0
    for name, fl in zip(entry[1].split("\0"), entry[3], strict=True):
        both = fl & 3
        if not both:
            continue
        if name[n:] in want:
            if both == 3:
                done += 1
            else:
                partial += 1
        else:
            extra += 1
    return done, partial, extra


def racy_cut() -> int:
    """ctimes at or after this are too fresh to trust in a later run."""
    return time.time_ns() - RACY_NS


def file_key(path: str, cut: int) -> tuple[int, int, int, int] | None:
    """(inode, size, mtime, ctime) of a file, or None when absent or too fresh to trust later."""
    try:
        s = os.stat(path)
    except OSError:
        return None
    if s.st_ctime_ns >= cut:
        return None
    return (s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)


# ----------------------------------------------------------------------------------------------
# Cache files: marshal (no code runs on load) behind a magic, a version and a CRC
# ----------------------------------------------------------------------------------------------
_HEADER = b"SCSC"


def load(path: str, root: str) -> dict[str, Any] | None:
    """The cached dict, or None when absent, corrupt, from another version or another tree."""
    try:
        with open(path, "rb") as fh:
            blob = fh.read()
        if len(blob) < 8 or blob[:4] != _HEADER:
            return None
        body = blob[8:]
        if zlib.crc32(body) != int.from_bytes(blob[4:8], "little"):
            return None
        data = marshal.loads(body)
    except Exception:  # noqa: BLE001 - any unreadable cache is no cache
        return None
    if (
        not isinstance(data, dict)
        or data.get("magic") != CACHE_MAGIC
        or data.get("version") != CACHE_VERSION
        or data.get("root") != root
    ):
        return None
    return data


def save(path: str, root: str, data: dict[str, Any]) -> bool:
    """Write atomically (a reader sees the old file or the new one); False when it cannot be written."""
    body = marshal.dumps({**data, "magic": CACHE_MAGIC, "version": CACHE_VERSION, "root": root})
    tmp = f"{path}{TMP_MARK}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(_HEADER + zlib.crc32(body).to_bytes(4, "little") + body)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
