"""The eight checks of ``event_windows``, one partition at a time, from disk only (no request).

The check step runs after ``event_windows`` has recorded the run's partitions. In a
single-partition run it returns ``AssetCheckResult``s and Dagster ties each to the partition's
materialization. A range run has no partition key, and an ``AssetCheckResult`` cannot name a
partition, so the step emits one ``AssetCheckEvaluation`` per partition and check instead; the
public API cannot name the materialization such an evaluation targets, so the UI's Partitions view
of a check counts them as out of date, while each is stored per partition with its status (see
benchmarks/README.md, decision record "public Dagster API only").
"""

from collections.abc import Iterator

import dagster as dg
import polars as pl

from smallcaps_ingest.core import check
from smallcaps_ingest.core.engine import windows_from_frame
from smallcaps_ingest.pipeline.partitions import symbols_partitions
from smallcaps_ingest.pipeline.resources import IngestSettings

ASSET = "event_windows"

CHECK_SPECS = [
    dg.AssetCheckSpec(
        name,
        asset=ASSET,
        description=check.CHECK_DESCRIPTIONS[name],
        partitions_def=symbols_partitions,
        blocking=False,
        additional_deps=["manifest"],
    )
    for name in (*check.ERROR_CHECKS, *check.WARN_CHECKS)
]


def _results(settings: IngestSettings, symbol: str, manifest: pl.DataFrame) -> Iterator[check.CheckOutcome]:
    windows = windows_from_frame(manifest.filter(pl.col("symbol") == symbol))
    yield from check.evaluate_symbol(settings.data_dir, symbol, windows, settings.quotes_hz)


def evaluations(
    settings: IngestSettings, symbol: str, manifest: pl.DataFrame
) -> Iterator[dg.AssetCheckEvaluation]:
    """One symbol's eight results as events of a range run's asset step (see the module doc)."""
    for r in _results(settings, symbol, manifest):
        yield dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey(ASSET),
            check_name=r.name,
            passed=r.passed,
            partition=symbol,
            severity=dg.AssetCheckSeverity(r.severity),
            description=r.description,
            metadata=r.metadata,
        )


@dg.multi_asset_check(
    specs=CHECK_SPECS,
    ins={"manifest": dg.AssetIn()},
    name="event_windows_checks",
    can_subset=True,  # outputs not required: a range run reports per partition instead (module doc)
)
def event_windows_checks(
    context: dg.AssetCheckExecutionContext, manifest: pl.DataFrame, settings: IngestSettings
) -> Iterator[dg.AssetCheckResult | dg.AssetCheckEvaluation]:
    """The selected checks of each symbol of the run: one pass over each symbol's files."""
    selected = {k.name for k in context.selected_asset_check_keys}
    if not context.has_partition_key:  # a range run: one evaluation per partition (module doc)
        for symbol in context.partition_keys:
            yield from (e for e in evaluations(settings, symbol, manifest) if e.check_name in selected)
        return
    for r in _results(settings, context.partition_key, manifest):
        if r.name in selected:
            yield dg.AssetCheckResult(
                asset_key=ASSET,
                check_name=r.name,
                passed=r.passed,
                severity=dg.AssetCheckSeverity(r.severity),
                description=r.description,
                metadata=r.metadata,
            )
