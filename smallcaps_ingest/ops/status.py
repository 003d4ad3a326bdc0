"""Where the ingest stands: ``smallcaps-ingest status``.

By default status answers from the Dagster instance: each symbol partition's last ``event_windows``
materialization carries its counts (events_total, events_complete, bytes; see ``_metadata`` in
pipeline/assets.py), the manifest's carries the events and symbols, and the materialization status
is the checkpoint. No file of the tree is listed, so the answer costs the same on any tree size.
What the instance cannot know, it does not claim: events on disk outside the manifest, empty event
directories and ``*.tmp*`` orphans are ``None``, and an incomplete event counts as missing.

``verify=True`` (``status --verify``), or no instance to ask, walks the tree instead with the
tree's one scanner (``layout.scan_tree``) and compares it with ``manifest.parquet``: *done* when both
files exist, *partial* when one does, *missing* when the manifest has it and the disk has neither,
*extra* when on disk but not in the manifest. Throughput, API usage and errors always come from
the instance (:mod:`smallcaps_ingest.ops.instance`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from smallcaps_ingest import layout, storage
from smallcaps_ingest.config import DEFAULT_MAX_RPS
from smallcaps_ingest.layout import FILES, SOURCE_FILE, TMP_MARK, ProgressFn, TreeScan  # noqa: F401
from smallcaps_ingest.ops.render import format_duration

DEFAULT_WINDOW_MINUTES = 30.0
DEFAULT_LAST_N = 20
EXAMPLES = 5
LIFETIME_CACHE = "status_cache.json"


class StatusError(RuntimeError):
    """A condition the CLI reports as a clear one-line error (exit code 1)."""


def read_manifest_ids(data_dir: str | os.PathLike[str]) -> dict[str, frozenset[str]] | None:
    """symbol -> its manifest event ids; None when there is no manifest yet."""
    path = layout.manifest_path(data_dir)
    if not storage.isfile(path):
        return None
    import polars as pl

    df = pl.read_parquet(storage.source(path), columns=["symbol", "event_id"])
    grouped = df.group_by("symbol").agg(pl.col("event_id"))
    return {
        s: frozenset(ids)
        for s, ids in zip(grouped["symbol"].to_list(), grouped["event_id"].to_list(), strict=True)
    }


class SymbolCoverage:
    """A symbol's manifest events against the disk."""

    def __init__(self, symbol: str, want: frozenset[str], disk: layout.SymbolDisk) -> None:
        self.symbol = symbol
        self.events = len(want)
        self.done = len(want & disk.complete)
        self.partial = len(want & disk.partial)
        self.missing = self.events - self.done - self.partial
        self.extra = len(disk.complete - want) + len(disk.partial - want)
        self.files, self.bytes = disk.files, disk.bytes

    @property
    def complete(self) -> bool:
        return self.events > 0 and self.done == self.events


def coverage(manifest: Mapping[str, frozenset[str]] | None, scan: TreeScan) -> dict[str, SymbolCoverage]:
    """Per symbol (manifest symbols and symbols on disk), the manifest events done/partial/missing."""
    manifest = manifest or {}
    empty = layout.SymbolDisk()
    return {
        sym: SymbolCoverage(sym, manifest.get(sym, frozenset()), scan.symbols.get(sym, empty))
        for sym in sorted(set(manifest) | set(scan.symbols))
    }


def _rel(data_dir: str, path: str) -> str:
    try:
        return os.path.relpath(path, data_dir)
    except ValueError:
        return path


def _manifest_block(data_dir: str, events: int | None, symbols: int | None, error: str | None) -> dict:
    return {"path": layout.manifest_path(data_dir), "present": events is not None, "error": error,
            "events": events, "symbols": symbols}


def _symbols_block(rows: list[tuple[int, int]], on_disk: int | None, have: bool) -> dict[str, Any]:
    """rows: (events, done) per manifest symbol."""
    return {
        "total": len(rows) if have else None,
        "complete": sum(1 for n, d in rows if d == n) if have else None,
        "started": sum(1 for n, d in rows if 0 < d < n) if have else None,
        "not_started": sum(1 for _, d in rows if d == 0) if have else None,
        "on_disk": on_disk,
    }


def _pct(ev: dict[str, Any]) -> None:
    if ev["total"] is not None:
        ev["pct_done"] = round(100.0 * ev["done"] / ev["total"], 2) if ev["total"] else 100.0


def disk_summary(data_dir: str, *, progress: ProgressFn | None = None) -> dict[str, Any]:
    """The disk and manifest half of ``status --verify``: a full walk of the tree, plain JSON values."""
    t0 = time.perf_counter()
    manifest_error = None
    try:
        manifest = read_manifest_ids(data_dir)
    except Exception as e:  # noqa: BLE001 - reported; status goes on with the disk alone
        manifest, manifest_error = None, f"{type(e).__name__}: {e}"
    t_manifest = time.perf_counter() - t0
    scan = layout.scan_tree(data_dir, progress=progress)
    t1 = time.perf_counter()
    cov = coverage(manifest, scan)
    have = manifest is not None
    rows = [c for c in cov.values() if c.events]
    disk = scan.symbols.values()
    orphans = scan.all_orphans()
    ev: dict[str, Any] = {
        "total": sum(c.events for c in rows) if have else None,
        "done": sum(c.done for c in rows) if have else None,
        "partial": sum(c.partial for c in rows) if have else None,
        "missing": sum(c.missing for c in rows) if have else None,
        "extra_on_disk": sum(c.extra for c in cov.values()),
        "complete_on_disk": sum(len(d.complete) for d in disk),
        "partial_on_disk": sum(len(d.partial) for d in disk),
        "empty_event_dirs": sum(d.empty_dirs for d in disk),
    }
    _pct(ev)
    return {
        "manifest": _manifest_block(
            data_dir,
            sum(len(v) for v in manifest.values()) if have else None,
            len(manifest) if have else None,
            manifest_error,
        ),
        "events": ev,
        "symbols": _symbols_block([(c.events, c.done) for c in rows], len(scan.symbols), have),
        "disk": {
            "files": scan.files,
            "bytes": scan.bytes,
            "tmp_orphans": len(orphans),
            "tmp_orphan_examples": [_rel(data_dir, p) for p in sorted(orphans)[:EXAMPLES]],
        },
        "timings_s": {"manifest": round(t_manifest, 4), "scan": round(scan.seconds, 4),
                      "compare": round(time.perf_counter() - t1, 4)},
    }


def counts_from_instance(
    data_dir: str, latest: Mapping[str, Any], partitions: list[str], manifest: tuple[int, int] | None
) -> dict[str, Any]:
    """The disk and manifest half of ``status`` from the partitions' last materializations.

    ``latest``: partition -> its last materialization (``instance.MatPoint``), materialized
    partitions only; ``manifest``: (events, symbols) from the manifest's last materialization."""
    have = manifest is not None
    symbols = partitions or sorted(latest)
    points = [latest[s] for s in symbols if s in latest]
    done = sum(min(p.events_complete, p.events_total) if p.events_total else p.events_complete
               for p in points)
    total = manifest[0] if manifest is not None else None
    rows = [(latest[s].events_total, latest[s].events_complete) if s in latest else (1, 0) for s in symbols]
    ev: dict[str, Any] = {
        "total": total,
        "done": done,
        "partial": 0,  # the instance records complete events only: the rest count as missing
        "missing": max(0, total - done) if total is not None else None,
        "extra_on_disk": None,
        "complete_on_disk": None,
        "partial_on_disk": None,
        "empty_event_dirs": None,
    }
    _pct(ev)
    sy = _symbols_block(rows, None, True)
    if manifest is not None:
        sy["total"] = manifest[1]
        sy["not_started"] = max(0, manifest[1] - sy["complete"] - sy["started"])
    return {
        "manifest": {**_manifest_block(data_dir, total, manifest[1] if have else None, None),
                     "present": have and storage.isfile(layout.manifest_path(data_dir))},
        "events": ev,
        "symbols": sy,
        "disk": {"files": 2 * done, "bytes": sum(p.bytes for p in points), "tmp_orphans": None,
                 "tmp_orphan_examples": []},
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
    tp = out["throughput"] = _eta(dict(out["throughput"]), disk["events"])
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
    out["notes"] = _notes(disk, inst)
    out["timings_s"] = {**disk.get("timings_s", {}), **inst.get("timings_s", {})}
    return out


def _eta(tp: dict[str, Any], events: Mapping[str, Any]) -> dict[str, Any]:
    remaining = events["total"] - events["done"] if events["total"] is not None else None
    # from the unrounded figures (events_per_min is rounded for display)
    rate = (tp["events_written"] / tp["elapsed_s"] * 60
            if tp.get("elapsed_s") and tp.get("events_written") else None)
    tp["remaining_events"] = remaining
    if remaining == 0:
        tp["eta_s"], tp["eta"] = 0.0, "done"
    elif remaining and rate:
        tp["eta_s"] = round(remaining / rate * 60, 1)
        tp["eta"] = format_duration(tp["eta_s"])
    else:
        tp["eta_s"], tp["eta"] = None, None
    return tp


def _notes(disk: Mapping[str, Any], inst: Mapping[str, Any]) -> list[str]:
    m = disk["manifest"]
    notes = []
    if m.get("error"):
        notes.append(f"the manifest at {m['path']} could not be read: {m['error']}")
    elif not m["present"]:
        notes.append(
            f"no manifest yet at {m['path']}: materialize the manifest asset first "
            "(events cannot be counted as done/partial/missing without it)"
        )
    if inst["instance"]["message"]:
        notes.append(inst["instance"]["message"])
    if disk["disk"]["tmp_orphans"]:
        notes.append(
            f"{disk['disk']['tmp_orphans']} *.tmp* orphan(s) on disk: `smallcaps-ingest cleanup --dry-run`"
        )
    if disk["disk"]["tmp_orphans"] is None:
        notes.append("counts from each partition's last materialization; `status --verify` walks the disk")
    return notes


def collect_status(
    data_dir: str,
    *,
    instance: Any = None,
    use_instance: bool = True,
    dagster_home: str | None = None,
    now: float | None = None,
    window_minutes: float = DEFAULT_WINDOW_MINUTES,
    last_n: int = DEFAULT_LAST_N,
    max_rps: float = DEFAULT_MAX_RPS,
    verify: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Everything ``status`` reports. ``instance=None`` opens the one at ``dagster_home`` (if any);
    the counts come from the instance unless ``verify`` or there is no instance (then the disk)."""
    from smallcaps_ingest.ops import summary

    t0 = time.perf_counter()
    data_dir = storage.absolute(data_dir)
    message = None
    if instance is None and use_instance:
        from smallcaps_ingest.ops.instance import open_instance

        instance, message = open_instance(dagster_home)
    t_open = time.perf_counter() - t0
    now = time.time() if now is None else now
    if instance is not None:
        cache = storage.join(layout.state_dir(data_dir), LIFETIME_CACHE)
        inst, counts = summary.instance_summary(
            instance, now=now, window_s=window_minutes * 60, last_n=last_n, cache_path=cache
        )
    else:
        inst, counts = summary.no_instance(message or "instance not read (--no-instance)", dagster_home), None
    inst["timings_s"]["instance_open"] = round(t_open, 4)
    if verify or counts is None:
        disk = disk_summary(data_dir, progress=progress)
    else:
        disk = counts_from_instance(data_dir, *counts)
    out = combine(data_dir, disk, inst, now=now, max_rps=max_rps)
    out["timings_s"]["total"] = round(time.perf_counter() - t0, 4)
    return out
