"""The eight checks of ``event_windows``, one partition at a time, from disk only (no request).

In a single-partition run the check step runs after ``event_windows`` has recorded the partition,
returns ``AssetCheckResult``s, and Dagster ties each to the partition's materialization. A range
run has no partition key, and an ``AssetCheckResult`` cannot name a partition, so the run records
one ``AssetCheckEvaluation`` per partition and check instead; the public API cannot name the
materialization such an evaluation targets, so the UI's Partitions view of a check counts them as
out of date, while each is stored per partition with its status (see benchmarks/README.md,
decision record "public Dagster API only"). In a range run that also materializes the asset (a
range of one partition too: such a run has no partition key either), the asset step evaluates each
symbol's selected checks as soon as the symbol is complete, while the other symbols are still being
fetched (their instance writes overlap the fetch; decision record D19), and the check step then has
nothing left to do.
"""

from collections.abc import Collection, Iterator

import dagster as dg
import polars as pl

from smallcaps_ingest.core import check
from smallcaps_ingest.core.engine import windows_from_frame
from smallcaps_ingest.pipeline.partitions import symbols_partitions
from smallcaps_ingest.pipeline.resources import IngestSettings

ASSET = "event_windows"
CHECKS_OP = "event_windows_checks"
CHECK_NAMES = (*check.ERROR_CHECKS, *check.WARN_CHECKS)

CHECK_SPECS = [
    dg.AssetCheckSpec(
        name,
        asset=ASSET,
        description=check.CHECK_DESCRIPTIONS[name],
        partitions_def=symbols_partitions,
        blocking=False,
        additional_deps=["manifest"],
    )
    for name in CHECK_NAMES
]


def _results(settings: IngestSettings, symbol: str, manifest: pl.DataFrame) -> Iterator[check.CheckOutcome]:
    windows = windows_from_frame(manifest.filter(pl.col("symbol") == symbol))
    yield from check.evaluate_symbol(settings.data_dir, symbol, windows, settings.quotes_hz)


def evaluations(
    settings: IngestSettings, symbol: str, manifest: pl.DataFrame, names: Collection[str]
) -> Iterator[dg.AssetCheckEvaluation]:
    """One symbol's results of the checks `names`, as events of a range run (see the module doc)."""
    for r in _results(settings, symbol, manifest):
        if r.name not in names:
            continue
        yield dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey(ASSET),
            check_name=r.name,
            passed=r.passed,
            partition=symbol,
            severity=dg.AssetCheckSeverity(r.severity),
            description=r.description,
            metadata=r.metadata,
        )


def checks_in_asset_step(context: dg.AssetExecutionContext) -> set[str]:
    """The checks a range run's asset step evaluates: those the run selected (all of the job's when
    the run names no selection)."""
    selected = context.run.asset_check_selection
    if selected is None:
        return set(CHECK_NAMES) if context.job_def.has_node_named(CHECKS_OP) else set()
    return {k.name for k in selected if k.asset_key == dg.AssetKey(ASSET)}


def _asset_step_in_run(context: dg.AssetCheckExecutionContext) -> bool:
    """Whether this run executes the asset's step (which then evaluated the checks itself)."""
    steps = context.run.step_keys_to_execute
    return context.job_def.has_node_named(ASSET) and (steps is None or ASSET in steps)


@dg.multi_asset_check(
    specs=CHECK_SPECS,
    ins={"manifest": dg.AssetIn()},
    name=CHECKS_OP,
    can_subset=True,  # outputs not required: a range run reports per partition instead (module doc)
)
def event_windows_checks(
    context: dg.AssetCheckExecutionContext, manifest: pl.DataFrame, settings: IngestSettings
) -> Iterator[dg.AssetCheckResult | dg.AssetCheckEvaluation]:
    """The selected checks of each symbol of the run: one pass over each symbol's files."""
    selected = {k.name for k in context.selected_asset_check_keys}
    if not context.has_partition_key:  # a range run: one evaluation per partition (module doc)
        if _asset_step_in_run(context):
            return  # the asset step evaluated them as each symbol completed
        for symbol in context.partition_keys:
            yield from evaluations(settings, symbol, manifest, selected)
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
