"""The ingest assets: ``symbol_events`` (observed), ``manifest``, ``event_windows`` (partitioned by
symbol) and ``compacted_windows``. Thin: the work is in ``core``; what is recorded per symbol is in
``records``; the checks are in ``checks``."""

import hashlib
import os
from collections.abc import Iterator
from datetime import date, timedelta

import dagster as dg
import polars as pl

from smallcaps_ingest import layout, storage
from smallcaps_ingest.core.compact import compact_symbol
from smallcaps_ingest.core.engine import FetchEngine, SymbolOutcome, windows_from_frame
from smallcaps_ingest.core.events import read_events
from smallcaps_ingest.core.manifest import build_manifest
from smallcaps_ingest.core.plan import DensityStore
from smallcaps_ingest.pipeline import checks, records
from smallcaps_ingest.pipeline.automation import (
    EVENT_WINDOWS_CONDITION,
    MANIFEST_CONDITION,
    events_file,
    file_version,
)
from smallcaps_ingest.pipeline.partitions import symbols_partitions
from smallcaps_ingest.pipeline.resources import IngestSettings, PolygonResource
from smallcaps_ingest.pipeline.runner import EngineThread

POOL = "polygon_api"
# Bump when the files' content changes for the same events (schema, shaping): every partition
# then shows as stale and a re-materialization rewrites it.
EVENT_WINDOWS_CODE_VERSION = "1"

__all__ = ["EVENT_WINDOWS_CODE_VERSION", "POOL", "compacted_windows", "event_windows", "manifest",
           "symbol_events", "symbols_partitions"]


class ManifestConfig(dg.Config):
    start_date: str | None = None  # inclusive, YYYY-MM-DD (America/New_York date of the event)
    end_date: str | None = None
    minutes_before: float = 3.0
    minutes_after: float = 7.0


def _date(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise dg.Failure(f"manifest config {name}={value!r} is not a YYYY-MM-DD date") from None


# Each symbol's slice of the manifest, as its own partitioned observable source asset. The manifest
# observes it with a data version per symbol (a hash of that symbol's event ids), so when the
# events of one symbol change, only that event_windows partition turns stale. Observable (not a
# bare AssetSpec, which the UI shows as a never-filled materializable asset): the UI shows it as
# observed, and "Observe" recomputes the versions from the manifest on disk.
@dg.observable_source_asset(
    partitions_def=symbols_partitions,
    group_name="ingest",
    description="Per-symbol slice of the manifest, only ever observed (never materialized): its data "
    "version is a hash of the symbol's event ids, so a change to one symbol's events marks only that "
    "event_windows partition stale. Observed by every `manifest` materialization.",
)
def symbol_events(settings: IngestSettings) -> dg.DataVersionsByPartition:
    path = layout.manifest_path(settings.data_dir)
    if not storage.isfile(path):
        raise dg.Failure(f"no manifest at {path}: materialize the manifest asset first")
    frame = pl.read_parquet(storage.source(path), columns=["symbol", "event_id"])
    return dg.DataVersionsByPartition(symbol_versions(frame))


def symbol_versions(df: pl.DataFrame) -> dict[str, str]:
    """A stable version per symbol: sha256 of its sorted event ids."""
    joined = df.group_by("symbol").agg(pl.col("event_id").sort().str.join("\n"))
    return {sym: hashlib.sha256(ids.encode()).hexdigest()[:16] for sym, ids in joined.iter_rows()}


@dg.asset(
    io_manager_key="io_manager",
    deps=[events_file],
    automation_condition=MANIFEST_CONDITION,
    description="Validated, de-duplicated events with their [-3, +7] min windows; registers symbols.",
    group_name="ingest",
)
def manifest(context: dg.AssetExecutionContext, config: ManifestConfig, settings: IngestSettings):  # type: ignore[no-untyped-def]
    # Hashed before reading: a change while reading leaves the recorded version behind the file,
    # so events_file_sensor runs the manifest again (see automation.py). A missing file or a
    # directory is left to read_events, which names the problem.
    path = settings.events_path
    events_version = file_version(path) if os.path.isfile(path) else None
    df, stats = build_manifest(
        read_events(path),
        start_date=_date(config.start_date, "start_date"),
        end_date=_date(config.end_date, "end_date"),
        before=timedelta(minutes=config.minutes_before),
        after=timedelta(minutes=config.minutes_after),
    )
    symbols = df["symbol"].unique(maintain_order=True).sort().to_list()
    known = set(context.instance.get_dynamic_partitions(symbols_partitions.name))
    new = [s for s in symbols if s not in known]
    if new:
        context.instance.add_dynamic_partitions(symbols_partitions.name, new)
    for sym, version in symbol_versions(df).items():
        yield dg.AssetObservation(
            asset_key=symbol_events.key, partition=sym, tags={"dagster/data_version": version}
        )
    # The manifest's own version covers what applies to every symbol (the window and date filter),
    # not the events: those are versioned per symbol above.
    shape_version = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]
    yield dg.Output(
        df,
        data_version=dg.DataVersion(shape_version),
        metadata={
            "events": stats.events,
            "symbols": stats.symbols,
            "duplicates_dropped": stats.duplicates_dropped,
            "filtered_out": stats.filtered_out,
            **{f"session_{k}": v for k, v in stats.per_session.items()},
            "new_partitions": len(new),
            "source_file": settings.events_path,
            "events_version": events_version,
        },
    )


@dg.asset(
    partitions_def=symbols_partitions,
    ins={"manifest": dg.AssetIn()},
    deps=[symbol_events],
    code_version=EVENT_WINDOWS_CODE_VERSION,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool=POOL,
    output_required=False,
    automation_condition=EVENT_WINDOWS_CONDITION,
    group_name="ingest",
    description=(
        "Trades (raw) and quotes (sampled) for each manifest event, written to "
        "event_windows/symbol=SYM/event=EVENT_ID/{trades,quotes}.parquet. Complete events are skipped."
    ),
)
def event_windows(
    context: dg.AssetExecutionContext,
    manifest: pl.DataFrame,
    polygon: PolygonResource,
    settings: IngestSettings,
):  # type: ignore[no-untyped-def]
    """Every symbol of the run on one engine; what is recorded when is described in records.py."""
    symbols = list(context.partition_keys)
    # A checkpoint is worth its write only when other symbols may still be fetched after it.
    ranged = len(symbols) > 1
    # A run over a partition range (one partition or more; the check step's own test) records its
    # checks here, each symbol's as it completes, while others are fetched (checks.py)
    check_names = set() if context.has_partition_key else checks.checks_in_asset_step(context)
    polygon.preflight()  # no key: stop here, before any request
    done: list[SymbolOutcome] = []
    failed: list[SymbolOutcome] = []
    for o in _fetch(context, manifest, polygon, settings, symbols):
        (failed if o.error is not None else done).append(o)
        if o.error is None:
            context.add_asset_metadata(records.outcome_metadata(o), partition_key=o.symbol)
            if ranged:
                yield records.checkpoint(context.asset_key, o)
            if check_names:
                yield from checks.evaluations(settings, o.symbol, manifest, check_names)
    if failed:
        for o in done if ranged else ():
            yield records.failure_record(context.asset_key, o)
        raise records.failure(failed, len(symbols))
    yield dg.MaterializeResult()  # Dagster records every partition of the run, with provenance


def _fetch(
    context: dg.AssetExecutionContext,
    manifest: pl.DataFrame,
    polygon: PolygonResource,
    settings: IngestSettings,
    symbols: list[str],
) -> Iterator[SymbolOutcome]:
    """Each symbol's outcome as it finishes, logged; the engine stops with the step."""
    work = {s: windows_from_frame(manifest.filter(pl.col("symbol") == s)) for s in symbols}
    engine = FetchEngine(
        polygon.get_client(),
        settings.data_dir,
        workers=polygon.workers,
        hz=settings.quotes_hz,
        max_overfetch=settings.max_overfetch,
        overfetch_rows=settings.overfetch_rows,
        density=DensityStore(storage.join(settings.data_dir, layout.STATE_DIR, layout.DENSITY_FILE)),
    )
    runner = EngineThread(engine, work)
    polygon.on_teardown(runner.stop)
    for o in runner.outcomes():
        if o.error is not None:
            context.log.error(f"{o.symbol}: {o.error}")
        else:
            context.log.info(
                f"{o.symbol}: {o.complete}/{o.events_total} events complete ({o.skipped} skipped), "
                f"{o.stats.total_requests} requests, {o.events_per_min:.0f} events/min"
            )
        yield o


@dg.asset(
    partitions_def=symbols_partitions,
    ins={"manifest": dg.AssetIn()},
    deps=[event_windows],
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="ingest",
    description=(
        "Each symbol's complete events, a trades and a quotes file per event type, in compacted/symbol=SYM/"
        ", for fast reading (smallcaps_ingest.read.load_windows uses them while they are fresh)."
    ),
)
def compacted_windows(
    context: dg.AssetExecutionContext, manifest: pl.DataFrame, settings: IngestSettings
) -> dg.MaterializeResult:
    done = [compact_symbol(settings.data_dir, s, manifest) for s in context.partition_keys]
    for r in done:
        context.log.info(f"{r.symbol}: {r.events} events compacted ({r.incomplete} incomplete left out)")
    return dg.MaterializeResult(metadata={
        "events": sum(r.events for r in done),
        "incomplete_events": sum(r.incomplete for r in done),
        "trades_rows": sum(r.rows.get("trades", 0) for r in done),
        "quotes_rows": sum(r.rows.get("quotes", 0) for r in done),
        "bytes": sum(r.bytes for r in done),
        "seconds": round(sum(r.seconds for r in done), 3),
    })
