"""``smallcaps-ingest reconcile``: the disk against the instance, per symbol partition of the manifest.

It walks the tree with the tree's scanner (``layout.scan_tree``), reads the instance through the
public API (``get_materialized_partitions``, ``get_dynamic_partitions``, ``get_run_records``) and,
with ``fix``, records through the public API too (``add_dynamic_partitions``,
``report_runless_asset_event``, ``wipe_asset_partitions``). Nothing on disk is touched.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

import dagster as dg

from smallcaps_ingest import layout, storage
from smallcaps_ingest.ops.instance import ASSET, EW, NOT_FINISHED, PARTITIONS, runs_touching
from smallcaps_ingest.ops.status import StatusError, SymbolCoverage, coverage, read_manifest_ids


def materialize_command(symbol: str, data_dir: str) -> str:
    return (
        f"SMALLCAPS_DATA_DIR={shlex.quote(data_dir)} dagster asset materialize -m smallcaps_ingest "
        f"--select {ASSET} --partition {shlex.quote(symbol)}"
    )


def _row(c: SymbolCoverage, registered: bool) -> dict[str, Any]:
    return {"symbol": c.symbol, "events": c.events, "done": c.done, "partial": c.partial,
            "missing": c.missing, "files": c.files, "bytes": c.bytes, "registered": registered}


def reconcile(data_dir: str, instance: dg.DagsterInstance, *, fix: bool = False) -> dict[str, Any]:
    """Disk against the instance, per symbol partition of the manifest.

    * materialized but incomplete on disk (partial or missing manifest events): listed with the exact
      re-materialization command; ``fix`` wipes their materializations where the event log storage
      supports partition wipes (``instance.wipe_asset_partitions``), otherwise (SQLite and Postgres in
      Dagster 1.13 raise NotImplementedError) records a runless AssetObservation per partition with
      ``needs_rematerialization=True`` so the UI shows it on the partition;
    * complete on disk but not materialized: ``fix`` records a runless AssetMaterialization with
      ``reconciled=True`` and the partition's counts (registering the partition first if the
      instance does not know it);
    * *foreign* event directories: ones holding data files under a symbol directory that are no
      manifest event of that symbol (named by an earlier version of the event ids, by an events file
      since changed, or under a symbol no longer in the manifest). Reported, never deleted.
    """
    data_dir = storage.absolute(data_dir)
    manifest = read_manifest_ids(data_dir)
    if manifest is None:
        raise StatusError(
            f"no manifest at {layout.manifest_path(data_dir)}: materialize the manifest asset first"
        )
    scan = layout.scan_tree(data_dir)
    cov = coverage(manifest, scan)
    materialized = instance.get_materialized_partitions(EW)
    registered = set(instance.get_dynamic_partitions(PARTITIONS))
    incomplete, unmaterialized = [], []
    for sym in sorted(manifest):
        c = cov[sym]
        if sym in materialized and c.done < c.events:
            incomplete.append(_row(c, sym in registered))
        elif sym not in materialized and c.done == c.events:
            unmaterialized.append(_row(c, sym in registered))
    foreign = foreign_events(manifest, scan)
    res: dict[str, Any] = {
        "data_dir": data_dir,
        "symbols": len(manifest),
        "materialized_partitions": len(materialized),
        "materialized_incomplete": incomplete,
        "complete_not_materialized": unmaterialized,
        "materialized_not_in_manifest": sorted(set(materialized) - set(manifest)),
        "foreign_events": foreign,
        "foreign_events_total": sum(f["count"] for f in foreign),
        "runs_in_progress": len(runs_touching(instance, NOT_FINISHED)),
        "commands": [materialize_command(r["symbol"], data_dir) for r in incomplete],
        "fixed": None,
    }
    if fix:
        res["fixed"] = _fix(instance, data_dir, incomplete, unmaterialized)
    return res


def _fix(
    instance: dg.DagsterInstance, data_dir: str, incomplete: list[dict[str, Any]],
    unmaterialized: list[dict[str, Any]],
) -> dict[str, Any]:
    fixed: dict[str, Any] = {"recorded_materializations": [], "registered_partitions": [],
                             "needs_rematerialization": [], "method": None}
    new_parts = [r["symbol"] for r in unmaterialized if not r["registered"]]
    if new_parts:
        instance.add_dynamic_partitions(PARTITIONS, new_parts)
        fixed["registered_partitions"] = new_parts
    for r in unmaterialized:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=EW,
                partition=r["symbol"],
                description="Recorded by smallcaps-ingest reconcile: every manifest event is complete on "
                "disk.",
                metadata={"reconciled": True, "events_total": r["events"], "events_complete": r["done"],
                          "files": r["files"], "bytes": r["bytes"]},
            )
        )
        fixed["recorded_materializations"].append(r["symbol"])
    if incomplete:
        syms = [r["symbol"] for r in incomplete]
        try:
            instance.wipe_asset_partitions(EW, syms)
            fixed["method"] = "wiped"
        except NotImplementedError:
            fixed["method"] = "observation"
            for r in incomplete:
                instance.report_runless_asset_event(_needs_rematerialization(r, data_dir))
        fixed["needs_rematerialization"] = syms
    return fixed


def _needs_rematerialization(r: Mapping[str, Any], data_dir: str) -> dg.AssetObservation:
    return dg.AssetObservation(
        asset_key=EW,
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


def foreign_events(
    manifest: Mapping[str, frozenset[str]], scan: layout.TreeScan, examples: int = 3
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
    if res["fixed"] is not None:
        lines += _fixed_lines(res["fixed"])
    return "\n".join(lines)


def _fixed_lines(fx: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
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
    return lines
