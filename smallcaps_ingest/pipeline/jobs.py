"""The jobs: ``ingest_event_windows``, ``check_event_windows`` and ``cleanup_and_reconcile``, and the
``ingestion_report`` asset. Thin: the logic lives in ``ops.report`` (coverage, table, plot) and
``ops.status`` (cleanup, reconcile).
"""

import dagster as dg
import polars as pl

from smallcaps_ingest.ops import cleanup as ops_cleanup
from smallcaps_ingest.ops import instance as ops_instance
from smallcaps_ingest.ops import reconcile as ops_reconcile
from smallcaps_ingest.ops import report
from smallcaps_ingest.pipeline.assets import event_windows
from smallcaps_ingest.pipeline.resources import IngestSettings

ingest_job = dg.define_asset_job(
    "ingest_event_windows",
    selection=dg.AssetSelection.assets(event_windows),
    description="Fetch the selected symbols' event windows (checks run with it).",
)
checks_job = dg.define_asset_job(
    "check_event_windows",
    selection=dg.AssetSelection.checks_for_assets(event_windows),
    description="Run the event_windows checks alone, from disk: no download.",
)


def _throughput_points(instance: dg.DagsterInstance) -> list[tuple[float, int, float]]:
    """(timestamp, events written, seconds) of every event_windows materialization that did work."""
    points = ops_instance.fetch_points(instance, ascending=True, cap=10**9)
    return [(p.ts, p.written, p.seconds) for p in points if not p.reconciled]


@dg.asset(
    deps=[event_windows],
    ins={"manifest": dg.AssetIn()},
    group_name="ingest",
    description=(
        "Per-symbol coverage of the manifest on disk (events, complete, partial, missing, empty windows, "
        "rows from parquet footers, bytes, first and last event), totals, and a plot of coverage and "
        "throughput. Also written to _reports/ingestion_report.parquet and .png."
    ),
)
def ingestion_report(
    context: dg.AssetExecutionContext, manifest: pl.DataFrame, settings: IngestSettings
) -> dg.MaterializeResult:
    out = report.run_report(settings.data_dir, manifest, _throughput_points(context.instance))
    t = out.totals
    context.log.info(
        f"coverage {t['coverage_pct']}%: {t['complete']}/{t['events']} events, "
        f"{t['symbols_complete']}/{t['symbols']} symbols complete"
    )
    metadata: dict[str, object] = {
        "report": dg.MetadataValue.md(out.markdown()),
        "plot_path": dg.MetadataValue.path(str(out.plot)),
        "parquet_path": dg.MetadataValue.path(str(out.parquet)),
        "dagster/row_count": out.frame.height,
        **{k: v for k, v in t.items() if v is not None},
    }
    return dg.MaterializeResult(metadata=metadata)


class CleanupConfig(dg.Config):
    grace_minutes: float = 60.0
    dry_run: bool = False
    force: bool = False  # clean up even while ingest runs are queued or in progress


class ReconcileConfig(dg.Config):
    fix: bool = False


@dg.op(
    out=dg.Out(dg.Nothing),
    description="Remove *.tmp* orphans older than the grace period; refuses while an ingest run is writing.",
)
def cleanup_tmp_orphans(context: dg.OpExecutionContext, config: CleanupConfig, settings: IngestSettings):  # type: ignore[no-untyped-def]
    res = ops_cleanup.cleanup(
        settings.data_dir,
        context.instance,
        grace_minutes=config.grace_minutes,
        dry_run=config.dry_run,
        force=config.force,
        exclude_run_id=context.run_id,
    )
    context.log.info(ops_cleanup.render_cleanup(res))
    if res["refused"]:
        raise dg.Failure(
            description=res["message"], metadata={"runs_in_progress": len(res["runs_in_progress"])}
        )
    return dg.Output(
        None,
        metadata={
            "removed": len(res["removed"]),
            "removed_bytes": res["removed_bytes"],
            "would_remove": len(res["would_remove"]),
            "kept_young": len(res["kept_young"]),
            "errors": len(res["errors"]),
            "dry_run": config.dry_run,
            "paths": dg.MetadataValue.md(
                "\n".join(f"- `{i['path']}`" for i in (res["removed"] or res["would_remove"])) or "none"
            ),
        },
    )


@dg.op(
    out=dg.Out(dg.Nothing),
    description="Compare the disk with the instance; with fix=True record complete partitions as "
    "materialized and mark incomplete materialized ones for re-materialization.",
)
def reconcile_partitions(context: dg.OpExecutionContext, config: ReconcileConfig, settings: IngestSettings):  # type: ignore[no-untyped-def]
    res = ops_reconcile.reconcile(settings.data_dir, context.instance, fix=config.fix)
    context.log.info(ops_reconcile.render_reconcile(res))
    fixed = res["fixed"] or {}
    return dg.Output(
        None,
        metadata={
            "materialized_incomplete": len(res["materialized_incomplete"]),
            "complete_not_materialized": len(res["complete_not_materialized"]),
            "materialized_not_in_manifest": len(res["materialized_not_in_manifest"]),
            "foreign_events": res["foreign_events_total"],  # never deleted, listed in the log
            "fixed": bool(config.fix),
            "recorded_materializations": len(fixed.get("recorded_materializations", [])),
            "fix_method": fixed.get("method") or "",
            "commands": dg.MetadataValue.md("\n".join(f"    {c}" for c in res["commands"]) or "none"),
        },
    )


@dg.job(
    name="cleanup_and_reconcile",
    description="Remove old *.tmp* orphans (never while ingest runs are writing) and reconcile the disk with "
    "the instance. The two ops are independent: a refused cleanup does not stop the reconcile.",
)
def cleanup_and_reconcile() -> None:
    cleanup_tmp_orphans()
    reconcile_partitions()
