"""The Dagster ``Definitions``: assets, checks, resources, jobs and sensors, from one ``Config``.

Every setting (its environment variable, default and validation) is in ``config.py``; this module
only assembles. ``POLYGON_BASE_URL=simulator`` picks the simulated Polygon resource.
"""

from __future__ import annotations

import dagster as dg

from smallcaps_ingest.config import Config
from smallcaps_ingest.core.cost import default_workers
from smallcaps_ingest.pipeline.assets import compacted_windows, event_windows, manifest, symbol_events
from smallcaps_ingest.pipeline.automation import automation_sensors, events_file
from smallcaps_ingest.pipeline.checks import event_windows_checks
from smallcaps_ingest.pipeline.jobs import checks_job, cleanup_and_reconcile, ingest_job, ingestion_report
from smallcaps_ingest.pipeline.resources import (
    AtomicPolarsParquetIOManager,
    IngestSettings,
    PolygonResource,
    SimulatedPolygonResource,
)

config = Config.from_env()

settings = IngestSettings(
    data_dir=config.data_dir,
    events_path=config.events_or_sample(),
    quotes_hz=config.quotes_hz,
    max_overfetch=config.max_overfetch,
    overfetch_rows=config.overfetch_rows,
)
polygon = (SimulatedPolygonResource if config.is_simulator else PolygonResource)(
    # An EnvVar reference, never the value: the key stays out of run config and the instance DB.
    api_key=dg.EnvVar("POLYGON_API_KEY") if config.api_key else None,
    base_url=config.base_url,
    max_rps=config.max_rps,
    workers=config.workers or default_workers(config.max_rps),
    budget_url=config.budget_url,
    budget_timeout=config.budget_timeout,
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
