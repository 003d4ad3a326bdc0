"""The one filesystem layer under the data directory: a local directory, or an S3 URL.

``SMALLCAPS_DATA_DIR`` is either a local directory (the os-based code paths, unchanged: the tree's
scanner lists 1.15 M files with ``os.scandir``) or ``s3://bucket/prefix``, reached through fsspec's
``s3fs`` (the filesystem dagster-polars' ``UPath`` already uses). S3 is configured only by the
standard AWS variables, which botocore reads itself (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, or any other credential source botocore knows): no
credential passes through this package, so none can reach a log, run metadata or a file.

What holds on S3 (benchmarks/README.md, D20):

- a PUT of a whole object is atomic: a reader sees all of it or nothing, so no temporary object is
  ever written (and there is no ``.tmp`` orphan to clean) and nothing is fsynced;
- an event is complete when both objects exist (quotes are written last); one object is *partial*;
- ``create_bytes`` is a conditional PUT (``If-None-Match: *``): the first writer wins;
- listing a prefix costs one LIST request per 1,000 keys; there are no directories.

Stdlib only at import (``status`` imports it through ``layout``); s3fs is imported on first use.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterable
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import s3fs

SCHEMES = ("s3",)  # what SMALLCAPS_DATA_DIR may name besides a local directory
S3 = "s3://"


def is_remote(path: object) -> bool:
    """Whether ``path`` (a str, a Path or a UPath) names an object in S3."""
    return str(path).startswith(S3)


def absolute(path: str) -> str:
    """A local path made absolute; a URL as given (without a trailing ``/``)."""
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base: object, *parts: str) -> str:
    """``base/part/...``: ``/`` in a URL, the platform's separator in a local path."""
    text = str(base)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *parts])
    return os.path.join(text, *parts)


def to_path(path: object) -> Any:
    """A ``pathlib.Path`` for a local path, a ``UPath`` (``/``, ``.name``, ``.parent``) for a URL."""
    if is_remote(path):
        from upath import UPath

        return UPath(str(path))
    from pathlib import Path

    return Path(path)  # type: ignore[arg-type]


@functools.cache
def _s3(pid: int) -> s3fs.S3FileSystem:
    import s3fs

    # Listings are never cached: another host (or process) writes the same tree. One client per
    # process (its event loop does not survive a fork).
    return s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)


def s3() -> s3fs.S3FileSystem:
    """This process's S3 filesystem, configured by the AWS_* variables (botocore reads them)."""
    return _s3(os.getpid())


def _key(url: str) -> str:
    return url[len(S3):] if url.startswith(S3) else url


def _url(key: str) -> str:
    return key if key.startswith(S3) else S3 + key


def write_bytes(path: object, data: bytes | memoryview | Any) -> int:
    """Write a whole file or object; returns its size. S3: one PUT, atomic, no temporary object.
    Local: ``store.atomic_write_bytes`` (tmp sibling, fsync, rename)."""
    if not is_remote(path):
        from pathlib import Path

        from smallcaps_ingest.core.store import atomic_write_bytes

        return atomic_write_bytes(data, Path(str(path)))
    raw = bytes(memoryview(data))
    s3().pipe_file(_key(str(path)), raw)
    return len(raw)


def create_bytes(path: object, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True when this call created it. S3: a
    conditional PUT (``If-None-Match: *``); local: a hard link of a complete temporary file."""
    if is_remote(path):
        try:
            s3().pipe_file(_key(str(path)), data, mode="create")
        except FileExistsError:  # 412 Precondition Failed: another writer was first
            return False
        return True
    from pathlib import Path

    from smallcaps_ingest import layout

    dest = Path(str(path))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = layout.tmp_path(dest)
    tmp.write_bytes(data)
    try:
        os.link(tmp, dest)  # atomic and exclusive
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def read_bytes(path: object) -> bytes:
    """The whole file or object (FileNotFoundError if there is none)."""
    if is_remote(path):
        return s3().cat_file(_key(str(path)))
    with open(str(path), "rb") as fh:
        return fh.read()


def source(path: object) -> Any:
    """What polars and pyarrow read a file from: the local path itself, else the object's bytes
    (one GET; polars' own object-store client would need the AWS settings handed to it again)."""
    if is_remote(path):
        import io

        return io.BytesIO(read_bytes(path))
    return str(path)


def read_many(paths: Iterable[str]) -> dict[str, bytes]:
    """Several whole objects, fetched concurrently (s3fs issues the GETs together)."""
    keys = {_key(p): p for p in paths}
    if not keys:
        return {}
    got = s3().cat(list(keys), on_error="raise")
    return {keys[k]: v for k, v in got.items()}


def open_read(path: object) -> IO[bytes]:
    """A binary reader (S3: ranged GETs, enough for a Parquet footer)."""
    if is_remote(path):
        return s3().open(_key(str(path)), "rb")
    return open(str(path), "rb")


def isfile(path: object) -> bool:
    if is_remote(path):
        return bool(s3().isfile(_key(str(path))))
    return os.path.isfile(str(path))


def remove(path: object) -> None:
    """Delete one file or object; a missing one is no error."""
    with contextlib.suppress(FileNotFoundError):
        if is_remote(path):
            s3().rm_file(_key(str(path)))
        else:
            os.unlink(str(path))


def _mtime_ns(info: dict[str, Any]) -> int:
    modified = info.get("LastModified")
    return int(modified.timestamp() * 1e9) if isinstance(modified, datetime) else 0


def _tag(info: dict[str, Any]) -> int:
    """The object's ETag as a 60-bit integer: what identifies its content (a listing and a HEAD
    agree on it, where their LastModified differ in precision)."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    return int(hashlib.blake2b(etag.encode(), digest_size=8).hexdigest()[:15], 16) if etag else 0


def identity(path: object) -> tuple[int, int, int] | None:
    """What changes when a file is replaced: (inode, size, mtime ns) locally, (ETag, size, 0) on
    S3; None if absent."""
    if is_remote(path):
        try:
            info = s3().info(_key(str(path)))
        except FileNotFoundError:
            return None
        return _tag(info), int(info["size"]), 0
    try:
        st = os.stat(str(path))
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def find(prefix: str) -> dict[str, tuple[int, int, int]]:
    """Every object under ``prefix/`` (a URL): url -> (size, mtime ns, identity tag as in
    ``identity``); one LIST request per 1,000 keys and nothing else (s3fs' ``find`` adds a HEAD and
    a second LIST when the prefix is empty, which every new symbol's is)."""
    bucket, _, key = _key(prefix).rstrip("/").partition("/")
    args: dict[str, Any] = {"Bucket": bucket, "Prefix": key + "/" if key else ""}
    out: dict[str, tuple[int, int, int]] = {}
    while True:
        page = s3().call_s3("list_objects_v2", **args)
        for o in page.get("Contents", []):
            out[f"{S3}{bucket}/{o['Key']}"] = (int(o["Size"]), _mtime_ns(o), _tag(o))
        if not page.get("IsTruncated"):
            return out
        args["ContinuationToken"] = page["NextContinuationToken"]


def list_prefixes(prefix: str) -> list[str]:
    """The URLs of the "directories" (common prefixes) directly under ``prefix`` (a URL)."""
    try:
        entries = s3().ls(_key(prefix).rstrip("/"), detail=True)
    except FileNotFoundError:
        return []
    return [_url(e["name"]) for e in entries if e.get("type") == "directory"]


def check_writable(path: str) -> None:
    """Raise (naming the problem) unless a file can be written under ``path``; writes nothing that
    stays. S3: the bucket must exist and accept a PUT (and a DELETE of the probe)."""
    if not is_remote(path):
        import tempfile

        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor.tmp."):
            return
    probe = join(path, f"_state/.doctor-probe.{os.getpid()}")
    write_bytes(probe, b"")
    remove(probe)
