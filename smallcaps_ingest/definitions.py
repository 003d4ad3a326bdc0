"""The Dagster ``Definitions``: assets, checks, resources and jobs, configured from the environment.

Environment: SMALLCAPS_EVENTS, SMALLCAPS_DATA_DIR (./data), POLYGON_API_KEY, POLYGON_BASE_URL
(``simulator`` = the bundled simulator), POLYGON_MAX_RPS (90), POLYGON_WORKERS (auto: 12,
more above 60 req/s), SMALLCAPS_QUOTES_HZ (1; 0 = raw quotes), SMALLCAPS_MAX_OVERFETCH (4),
SMALLCAPS_OVERFETCH_ROWS (auto: from POLYGON_MAX_RPS), POLYGON_BUDGET_URL (sqlite:// under
DAGSTER_HOME; redis://host:port/db for many hosts), POLYGON_BUDGET_TIMEOUT (120 s),
SMALLCAPS_AUTOMATION (off; on = the daily flow's sensors start RUNNING, see automation.py),
SMALLCAPS_AUTOMATION_INTERVAL (60 s).
"""

from __future__ import annotations

import os

import dagster as dg

from smallcaps_ingest.core.engine import default_workers
from smallcaps_ingest.core.polygon.client import OFFICIAL_BASE_URL
from smallcaps_ingest.pipeline.assets import (
    compacted_windows,
    event_windows,
    event_windows_checks,
    manifest,
    symbol_events,
)
from smallcaps_ingest.pipeline.automation import automation_sensor, events_file, events_file_sensor
from smallcaps_ingest.pipeline.jobs import cleanup_and_reconcile, ingestion_report
from smallcaps_ingest.pipeline.resources import (
    AtomicPolarsParquetIOManager,
    IngestSettings,
    PolygonResource,
    budget_url_from_env,
    env_number,
)
from smallcaps_ingest.simulator.sample import SAMPLE_EVENTS_PATH

DATA_DIR = os.path.abspath(os.environ.get("SMALLCAPS_DATA_DIR") or "./data")

settings = IngestSettings(
    data_dir=DATA_DIR,
    events_path=os.path.abspath(os.environ.get("SMALLCAPS_EVENTS") or str(SAMPLE_EVENTS_PATH)),
    quotes_hz=env_number("SMALLCAPS_QUOTES_HZ", 1.0, float, minimum=0, maximum=1e9),
    max_overfetch=env_number("SMALLCAPS_MAX_OVERFETCH", 4.0, float, minimum=1),
    overfetch_rows=(
        None
        if os.environ.get("SMALLCAPS_OVERFETCH_ROWS", "auto").strip().lower() in ("", "auto")
        else int(env_number("SMALLCAPS_OVERFETCH_ROWS", 0, int, minimum=0))
    ),
)
_max_rps = env_number("POLYGON_MAX_RPS", 90.0, float, minimum=0.001)
polygon = PolygonResource(
    # An EnvVar reference, never the value: the key stays out of run config and the instance DB.
    api_key=dg.EnvVar("POLYGON_API_KEY") if os.environ.get("POLYGON_API_KEY") else None,
    base_url=os.environ.get("POLYGON_BASE_URL") or OFFICIAL_BASE_URL,
    max_rps=_max_rps,
    workers=(
        default_workers(_max_rps)
        if os.environ.get("POLYGON_WORKERS", "auto").strip().lower() in ("", "auto")
        else int(env_number("POLYGON_WORKERS", 12, int, minimum=1))
    ),
    budget_url=budget_url_from_env(),
    budget_timeout=env_number("POLYGON_BUDGET_TIMEOUT", 120.0, float, minimum=0),
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
    sensors=[automation_sensor, events_file_sensor],
    resources={
        "polygon": polygon,
        "settings": settings,
        "io_manager": AtomicPolarsParquetIOManager(base_dir=DATA_DIR),
    },
)
