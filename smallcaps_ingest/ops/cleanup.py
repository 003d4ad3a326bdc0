"""``smallcaps-ingest cleanup``: remove ``*.tmp*`` orphans of interrupted writes, and mark runs whose
process died as failed (``instance.report_run_failed``), freeing their pool slots.

Orphans are found by the tree's scanner (``layout.scan_tree``) plus the top of the data directory,
``_state/`` and ``_reports/``; only regular files named as temporary files are ever removed, never
while a run that writes the tree is queued or in progress (unless forced). On S3 there is nothing to
remove: every object is written by one atomic PUT, never through a temporary object (a partial event,
one object of two, is re-fetched by the next run, as on local disk).
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Mapping
from typing import Any

import dagster as dg

from smallcaps_ingest import layout, storage
from smallcaps_ingest.layout import EVENT_PREFIX, FILES, MANIFEST_FILE, SOURCE_FILE, SYMBOL_PREFIX, TMP_MARK
from smallcaps_ingest.ops.instance import ASSET, MANIFEST_ASSET, NOT_FINISHED, runs_touching
from smallcaps_ingest.ops.render import format_bytes, format_duration

S3_NOTE = "the tree is on S3: objects are written by one atomic PUT, so there are no tmp orphans"


def _rel(data_dir: str, path: str) -> str:
    try:
        return os.path.relpath(path, data_dir)
    except ValueError:
        return path


def find_tmp_orphans(data_dir: str) -> list[str]:
    """Every *.tmp* file under event_windows/ (all levels), at the top of the data dir (manifest and
    source tmp files), under _state/ and _reports/. Never a directory, never a symlink."""
    scan = layout.scan_tree(data_dir)
    found = [p for p in scan.all_orphans() if os.path.isfile(p) and not os.path.islink(p)]
    for d in (data_dir, layout.state_dir(data_dir), layout.reports_dir(data_dir)):
        found.extend(layout.tmp_files_in(d))
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


# Whether ``os.kill(pid, 0)`` only probes a process. POSIX: yes. Windows: it would terminate it, so
# there a run is never taken for dead (a test forces this).
CAN_PROBE_PIDS = os.name == "posix"


def process_gone(pid: int) -> bool:
    """True only when no process ``pid`` exists; False when it exists or this host cannot tell."""
    if not CAN_PROBE_PIDS:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by someone else
    return False


def fail_dead_runs(instance: Any, exclude_run_id: str | None = None) -> list[str]:
    """Mark runs whose process died (kill -9, OOM, reboot) as failed and free their pool slots.

    An in-process CLI run that is killed stays STARTED forever and keeps its ``polygon_api`` slot,
    so after two such kills every later run waits on the pool. A run counts as dead when the
    process that wrote its RUN_START event on this host no longer exists.
    """
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
        if not process_gone(pid):
            continue
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
    data_dir = storage.absolute(data_dir)
    now = time.time() if now is None else now
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
    acting = not (refused_msg or dry_run)
    removed, kept, errors, emptied = _sweep(data_dir, now - grace_minutes * 60, now, acting)
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
        **({"note": S3_NOTE} if storage.is_remote(data_dir) else {}),
    }


def _sweep(
    data_dir: str, cutoff: float, now: float, acting: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], list[str]]:
    """(removed or, when not ``acting``, would be removed; kept as younger than ``cutoff``; errors;
    event directories removed once empty) over every tmp orphan."""
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
        if st.st_mtime > cutoff:
            kept.append(item)
            continue
        if not acting:
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
    return removed, kept, errors, emptied


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
    if res.get("note"):
        lines.append(res["note"])
    return "\n".join(lines)


