"""Dagster glue: manifest -> event_windows (partitioned by symbol) and its checks. Kept thin."""

import hashlib
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import date

import dagster as dg
import polars as pl

from smallcaps_ingest.core import check
from smallcaps_ingest.core.engine import FetchEngine, SymbolOutcome, windows_from_frame
from smallcaps_ingest.core.events import read_events
from smallcaps_ingest.core.manifest import build_manifest
from smallcaps_ingest.core.plan import DensityStore, Window
from smallcaps_ingest.pipeline.automation import (
    EVENT_WINDOWS_CONDITION,
    MANIFEST_CONDITION,
    events_file,
    file_version,
)
from smallcaps_ingest.pipeline.resources import IngestSettings, PolygonResource

symbols_partitions = dg.DynamicPartitionsDefinition(name="symbols")
POOL = "polygon_api"
# Bump when the files' content changes for the same events (schema, shaping): every partition
# then shows as stale and a re-materialization rewrites it.
EVENT_WINDOWS_CODE_VERSION = "1"


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
    path = f"{settings.data_dir}/manifest.parquet"
    if not os.path.exists(path):
        raise dg.Failure(f"no manifest at {path}: materialize the manifest asset first")
    return dg.DataVersionsByPartition(symbol_versions(pl.read_parquet(path, columns=["symbol", "event_id"])))


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
    from datetime import timedelta

    # Hashed before reading: a change while reading leaves the recorded version behind the file,
    # so events_file_sensor runs the manifest again (see automation.py).
    events_version = file_version(settings.events_path)
    events = read_events(settings.events_path)
    df, stats = build_manifest(
        events,
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


def _metadata(o: SymbolOutcome) -> dict[str, object]:
    s = o.stats
    return {
        "events_total": o.events_total,
        "events_complete": o.complete,
        "events_skipped": o.skipped,
        "events_written": o.written,
        "events_empty": o.empty,
        "requests": s.total_requests,
        "requests_per_event": round(s.total_requests / o.written, 3) if o.written else 0.0,
        "pages": s.pages,
        "429s": s.throttled,
        "retries": sum(s.retries.values()),
        "rows": s.rows_kept,
        "rows_raw": s.rows_raw,
        "bytes": o.files_bytes,
        "bytes_downloaded": s.bytes,
        "events_per_min": round(o.events_per_min, 1),
        "budget_wait_s": round(s.budget_wait_s, 3),
        "errors_by_type": dg.MetadataValue.json(s.error_counts()),
        "requests_by_endpoint": dg.MetadataValue.json(dict(s.requests)),
        "retries_by_cause": dg.MetadataValue.json(dict(s.retries)),
        "seconds": round(o.seconds, 3),
    }


def _provenance_tags(
    instance: dg.DagsterInstance, symbol: str, code_version: str, before_storage_id: int | None = None
) -> dict[str, str]:
    """Data-version provenance for one partition's materialization in a multi-partition run.

    Dagster writes these tags itself for a run's regular output; per-partition materializations
    logged mid-run need them too, or every partition would look stale after any manifest run.
    ``before_storage_id`` pins the inputs to what the instance held when the step loaded the
    manifest: a manifest re-materialized during a long run must not be credited to partitions
    fetched from the old one (a symbol whose events changed would then look fresh, its new events
    never fetched).
    """
    from dagster._core.definitions.data_version import (
        CODE_VERSION_TAG,
        DATA_VERSION_TAG,
        compute_logical_data_version,
        get_input_data_version_tag,
        get_input_event_pointer_tag,
    )

    inputs: dict[dg.AssetKey, tuple[str, int | None]] = {}
    man = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("manifest"), before_storage_id=before_storage_id), limit=1
    ).records
    obs = instance.fetch_observations(
        dg.AssetRecordsFilter(
            asset_key=symbol_events.key, asset_partitions=[symbol], before_storage_id=before_storage_id
        ),
        limit=1,
    ).records
    for key, recs in ((dg.AssetKey("manifest"), man), (symbol_events.key, obs)):
        event_tags = (recs[0].event_log_entry.tags or {}) if recs else {}
        version = event_tags.get(DATA_VERSION_TAG, "INITIAL")
        inputs[key] = (version, recs[0].storage_id if recs else None)
    tags = {CODE_VERSION_TAG: code_version}
    for key, (version, storage_id) in inputs.items():
        tags[get_input_data_version_tag(key)] = version
        tags[get_input_event_pointer_tag(key)] = str(storage_id) if storage_id else "NULL"
    tags[DATA_VERSION_TAG] = compute_logical_data_version(
        code_version, {k: dg.DataVersion(v) for k, (v, _) in inputs.items()}
    ).value
    return tags


def _latest_materialization(instance: dg.DagsterInstance, symbol: str):  # type: ignore[no-untyped-def]
    """The materialization a check evaluation refers to; without it the UI treats the result as
    out of date and shows the partition's check as skipped."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("event_windows"), asset_partitions=[symbol]), limit=1
    ).records
    if not records:
        return None
    rec = records[0]
    return AssetCheckEvaluationTargetMaterializationData(
        storage_id=rec.storage_id, run_id=rec.event_log_entry.run_id, timestamp=rec.timestamp
    )


def _check_evaluations(settings: IngestSettings, symbol: str, manifest_df: pl.DataFrame):  # type: ignore[no-untyped-def]
    windows = windows_from_frame(manifest_df.filter(pl.col("symbol") == symbol))
    yield from check.evaluate_symbol(settings.data_dir, symbol, windows, settings.quotes_hz)


# After an interrupt, how long the step waits for the engine's requests in flight (their pages are
# not followed) and for the writes of what was fetched, before it lets the interrupt go on.
STOP_WAIT_SECONDS = 8.0


class EngineThread:
    """A ``FetchEngine`` run on its own thread, its outcomes handed to the step's thread.

    Dagster delivers SIGTERM, SIGINT and a run termination to a step as ``KeyboardInterrupt`` or
    ``DagsterExecutionInterruptedError`` on the step's main thread only (the executor relays the
    signal to step processes), here while it waits for the next outcome; the engine's threads
    would carry on fetching every remaining page. So whenever ``outcomes`` is left before the run
    ended, and when the step's resources are torn down (an interrupt may land while Dagster handles
    a yielded event, and then the asset is never resumed), the engine is stopped and given
    ``STOP_WAIT_SECONDS`` to finish its requests in flight and its writes.
    """

    def __init__(self, engine: FetchEngine, work: Mapping[str, Sequence[Window]]):
        self.engine = engine
        self._work = work
        self._done: queue.Queue[SymbolOutcome | None] = queue.Queue()
        self._crashed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="fetch-engine", daemon=True)

    def _run(self) -> None:
        try:
            self.engine.run(self._work, on_symbol_done=self._done.put)
        except BaseException as e:  # noqa: BLE001 - re-raised on the step's thread
            self._crashed.append(e)
        finally:
            self._done.put(None)

    def outcomes(self) -> Iterator[SymbolOutcome]:
        """Each symbol's outcome as it finishes; re-raises what crashed the engine."""
        self._thread.start()
        ended = False
        try:
            while (o := self._done.get()) is not None:
                yield o
            ended = True
        finally:
            if not ended:
                self.stop()
        if self._crashed:
            raise self._crashed[0]

    def stop(self) -> None:
        """Stop the engine and wait (bounded) for it; a repeated interrupt does not cut the wait."""
        self.engine.stop()
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while self._thread.is_alive() and (left := deadline - time.monotonic()) > 0:
            try:
                self._thread.join(timeout=left)
            except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError):
                continue  # the multiprocess executor relays the same stop to its step process


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
    symbols = list(context.partition_keys)
    # Only a run tagged dagster/partition gives its check step a partition; any range run (even
    # XELB...XELB from a UI backfill) records materializations and check results per symbol here.
    single = context.has_partition_key
    inputs_before = None
    if not single:  # Dagster records a single partition's provenance itself
        # the manifest input is loaded: provenance is pinned to the records the instance holds now
        last_id = context.instance.event_log_storage.get_maximum_record_id()
        inputs_before = None if last_id is None else last_id + 1
    polygon.preflight()  # no key and no simulator: stop here, before any request
    work = {s: windows_from_frame(manifest.filter(pl.col("symbol") == s)) for s in symbols}
    engine = FetchEngine(
        polygon.get_client(),
        settings.data_dir,
        workers=polygon.workers,
        hz=settings.quotes_hz,
        max_overfetch=settings.max_overfetch,
        overfetch_rows=settings.overfetch_rows,
        density=DensityStore(f"{settings.data_dir}/_state/density.json"),
    )
    runner = EngineThread(engine, work)
    polygon.on_teardown(runner.stop)
    failed: list[SymbolOutcome] = []
    outcomes: list[SymbolOutcome] = []
    for o in runner.outcomes():
        outcomes.append(o)
        if o.error is not None:
            failed.append(o)
            context.log.error(f"{o.symbol}: {o.error}")
            continue
        context.log.info(
            f"{o.symbol}: {o.complete}/{o.events_total} events complete ({o.skipped} skipped), "
            f"{o.stats.total_requests} requests, {o.events_per_min:.0f} events/min"
        )
        if single:
            continue  # one partition: the MaterializeResult below, then the check steps
        # many partitions in one run: record each symbol as soon as it is complete, so a
        # failure later in the run keeps what finished, and evaluate its checks right here.
        yield dg.AssetMaterialization(
            asset_key=context.asset_key,
            partition=o.symbol,
            metadata=_metadata(o),
            tags=_provenance_tags(context.instance, o.symbol, EVENT_WINDOWS_CODE_VERSION, inputs_before),
        )
        target = _latest_materialization(context.instance, o.symbol)
        for r in _check_evaluations(settings, o.symbol, manifest):
            yield dg.AssetCheckEvaluation(
                target_materialization_data=target,
                asset_key=context.asset_key,
                check_name=r.name,
                passed=r.passed,
                partition=o.symbol,
                severity=dg.AssetCheckSeverity(r.severity),
                description=r.description,
                metadata=r.metadata,
            )
    if failed:
        raise dg.Failure(
            description=f"{len(failed)} of {len(symbols)} symbols failed: "
            + "; ".join(f"{o.symbol}: {o.error}" for o in failed[:10]),
            metadata={"failed_symbols": ", ".join(o.symbol for o in failed)},
        )
    if single:
        yield dg.MaterializeResult(metadata=_metadata(outcomes[0]))


CHECK_SPECS = [
    dg.AssetCheckSpec(
        name,
        asset="event_windows",
        description=check.CHECK_DESCRIPTIONS[name],
        partitions_def=symbols_partitions,
        blocking=False,
        additional_deps=["manifest"],
    )
    for name in (*check.ERROR_CHECKS, *check.WARN_CHECKS)
]


@dg.multi_asset_check(specs=CHECK_SPECS, ins={"manifest": dg.AssetIn()}, name="event_windows_checks")
def event_windows_checks(
    context: dg.AssetCheckExecutionContext, manifest: pl.DataFrame, settings: IngestSettings
):  # type: ignore[no-untyped-def]
    """All eight checks of one symbol, from disk only (no request): one step, one pass over the files."""
    symbol = context.op_execution_context.partition_key
    for r in _check_evaluations(settings, symbol, manifest):
        yield dg.AssetCheckResult(
            asset_key="event_windows",
            check_name=r.name,
            passed=r.passed,
            severity=dg.AssetCheckSeverity(r.severity),
            description=r.description,
            metadata=r.metadata,
        )


@dg.asset(
    partitions_def=symbols_partitions,
    ins={"manifest": dg.AssetIn()},
    deps=[event_windows],
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="ingest",
    description=(
        "Each symbol's complete events in one trades and one quotes file under compacted/symbol=SYM/, "
        "for fast reading (smallcaps_ingest.read.load_windows uses them while they are fresh)."
    ),
)
def compacted_windows(
    context: dg.AssetExecutionContext, manifest: pl.DataFrame, settings: IngestSettings
) -> dg.MaterializeResult:
    from smallcaps_ingest.core.compact import compact_symbol

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
