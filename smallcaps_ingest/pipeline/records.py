"""What ``event_windows`` records for each symbol: the metadata of its materialization.

A run of one symbol records it once, from the step's ``MaterializeResult``. A run of several
records each symbol twice: a checkpoint as soon as the symbol is complete (so a stop, a crash or a
failure later in the run keeps what finished), then, when the step succeeds, Dagster's own record
of every partition of the run, which carries the data-version provenance (the public API cannot
add provenance to a record written mid-run). Both carry the full metadata (the checkpoint also
``checkpoint=True``), so a killed run's work is still counted; ``status`` counts a partition's work
once per run, from its checkpoint when it has one (ops/instance.py). When the step
fails, each complete symbol gets a full record without provenance before the failure is raised.
"""

import dagster as dg

from smallcaps_ingest.core.engine import SymbolOutcome


def outcome_metadata(o: SymbolOutcome) -> dict[str, object]:
    """The full metadata of one symbol's materialization: counts, requests, errors, timings."""
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


def checkpoint(asset_key: dg.AssetKey, o: SymbolOutcome) -> dg.AssetMaterialization:
    """The record of a symbol complete mid-run: its full metadata, no provenance (see the module
    doc). Status counts a run's work once: from the checkpoint, not from the record that follows."""
    return dg.AssetMaterialization(
        asset_key=asset_key, partition=o.symbol, metadata={**outcome_metadata(o), "checkpoint": True}
    )


def failure_record(asset_key: dg.AssetKey, o: SymbolOutcome) -> dg.AssetMaterialization:
    """The full record of a symbol that completed in a run that then failed (no provenance)."""
    return dg.AssetMaterialization(asset_key=asset_key, partition=o.symbol, metadata=outcome_metadata(o))


def failure(failed: list[SymbolOutcome], total: int) -> dg.Failure:
    return dg.Failure(
        description=f"{len(failed)} of {total} symbols failed: "
        + "; ".join(f"{o.symbol}: {o.error}" for o in failed[:10]),
        metadata={"failed_symbols": ", ".join(o.symbol for o in failed)},
    )
