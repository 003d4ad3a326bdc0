"""The Dagster ``Definitions``: assets, checks, resources, jobs and sensors, from one ``Config``.

Every setting (its environment variable, default and validation) is in ``config.py``.
"""

from __future__ import annotations

import dagster as dg

from smallcaps_ingest.config import Config
from smallcaps_ingest.core.engine import default_workers
from smallcaps_ingest.pipeline.assets import (
    compacted_windows,
    event_windows,
    event_windows_checks,
    manifest,
    symbol_events,
)
from smallcaps_ingest.pipeline.automation import automation_sensors, events_file
from smallcaps_ingest.pipeline.jobs import cleanup_and_reconcile, ingestion_report
from smallcaps_ingest.pipeline.resources import (
    AtomicPolarsParquetIOManager,
    IngestSettings,
    PolygonResource,
)

config = Config.from_env()

settings = IngestSettings(
    data_dir=config.data_dir,
    events_path=config.events_or_sample(),
    quotes_hz=config.quotes_hz,
    max_overfetch=config.max_overfetch,
    overfetch_rows=config.overfetch_rows,
)
polygon = PolygonResource(
    # An EnvVar reference, never the value: the key stays out of run config and the instance DB.
    api_key=dg.EnvVar("POLYGON_API_KEY") if config.api_key else None,
    base_url=config.base_url,
    max_rps=config.max_rps,
    workers=config.workers or default_workers(config.max_rps),
    budget_url=config.budget_url,
    budget_timeout=config.budget_timeout,
)

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

defs = dg.Definitions(
    assets=[events_file, manifest, symbol_events, event_windows, ingestion_report, compacted_windows],
    asset_checks=[event_windows_checks],
    jobs=[ingest_job, checks_job, cleanup_and_reconcile],
    sensors=automation_sensors(config),
    resources={
        "polygon": polygon,
        "settings": settings,
        "io_manager": AtomicPolarsParquetIOManager(base_dir=config.data_dir),
    },
)
