"""The daily flow on its own: the events file as an observable source, the automation conditions
of ``manifest`` and ``event_windows``, and the two sensors that drive them.

Off by default: both sensors start STOPPED unless ``Config.automation`` (``SMALLCAPS_AUTOMATION=on``),
so the demo and the tests never launch automated runs unless asked. ``Config.automation_interval``
is how often the events file is hashed and the conditions are evaluated.

Chain: ``events_file_sensor`` records an observation of ``events_file`` only when the file's content
hash changed -> ``manifest`` (condition: a dep's *data version* changed) re-materializes and
observes ``symbol_events`` per symbol -> only the ``event_windows`` partitions whose
``symbol_events`` version changed, or that are new, are requested. All runs are launched by the
daemon, so they go through the run queue, the ``polygon_api`` pool and the request budget.
"""

from __future__ import annotations

import hashlib

import dagster as dg

from smallcaps_ingest.config import Config
from smallcaps_ingest.pipeline.resources import IngestSettings

DATA_VERSION_TAG = "dagster/data_version"


def file_version(path: str) -> str:
    """sha256 of the file's content: a copy or ``touch`` that leaves the events as they were is no
    change (mtime+size would re-run the manifest for nothing); hashing even a 50 MB file is ~0.1 s."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dg.observable_source_asset(
    group_name="ingest",
    required_resource_keys={"settings"},
    description="The events file (SMALLCAPS_EVENTS), only ever observed: its data version is a hash "
    "of its content, so the UI shows when it changed. Observed by `events_file_sensor` (when "
    "SMALLCAPS_AUTOMATION=on) or with 'Observe'.",
)
def events_file(context) -> dg.DataVersion:  # type: ignore[no-untyped-def]
    return dg.DataVersion(file_version(context.resources.settings.events_path))


# manifest: re-materialize when the events file's data version changed (a re-observation of an
# unchanged file is an observation, not a change: `any_deps_updated` would count it).
MANIFEST_CONDITION = (
    dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed())
    .allow(dg.AssetSelection.assets(events_file.key))
    .since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("events_file_changed")

# event_windows: per partition, a new symbol (newly missing) or a symbol whose symbol_events
# version changed. The manifest dependency is ignored: every manifest run updates it, and its
# own version covers only the window shape (change that by hand, with a backfill).
EVENT_WINDOWS_CONDITION = (
    (
        dg.AutomationCondition.newly_missing()
        | dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed()).ignore(
            dg.AssetSelection.assets("manifest")
        )
    ).since_last_handled()
    & ~dg.AutomationCondition.any_deps_missing().ignore(dg.AssetSelection.assets("manifest"))
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("symbol_events_changed_or_new")


MANIFEST_KEY = dg.AssetKey("manifest")
IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED]


def manifest_read_version(instance: dg.DagsterInstance) -> tuple[str | None, float]:
    """The events file version the last manifest was built from (its ``events_version`` metadata),
    and when that manifest was recorded (0 if never)."""
    event = instance.get_latest_materialization_event(MANIFEST_KEY)
    mat = event.asset_materialization if event else None
    value = mat.metadata.get("events_version") if mat else None
    read = getattr(value, "value", value) if value is not None else None
    return read, (event.timestamp if event else 0.0)


def observed_at(instance: dg.DagsterInstance, version: str) -> float | None:
    """When ``events_file`` was last observed, if that observation carries ``version``."""
    records = instance.fetch_observations(events_file.key, limit=1).records
    if not records or records[0].asset_observation.tags.get(DATA_VERSION_TAG) != version:
        return None
    return records[0].timestamp


def manifest_in_progress(instance: dg.DagsterInstance) -> bool:
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS), limit=100)
    return any(MANIFEST_KEY in (r.asset_selection or ()) for r in runs)


def events_file_sensor(context: dg.SensorEvaluationContext, settings: IngestSettings):  # type: ignore[no-untyped-def]
    version = file_version(settings.events_path)
    if version != context.cursor:
        return dg.SensorResult(
            asset_events=[dg.AssetObservation(asset_key=events_file.key, tags={DATA_VERSION_TAG: version})],
            cursor=version,
        )
    # The race the conditions cannot see: a manifest run that started before the change finishes
    # after the observation, and its materialization counts as handling the change. Its metadata
    # says which content it read; if a manifest recorded after the observation read other content
    # and nothing is running, run it again. (A manifest older than the observation is the
    # conditions' to re-run: they have not reacted yet.)
    read, recorded = manifest_read_version(context.instance)
    seen = observed_at(context.instance, version)
    if read is None or read == version or seen is None or recorded <= seen \
            or manifest_in_progress(context.instance):
        return dg.SkipReason(f"events file unchanged ({version})")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"manifest-{version}")], cursor=version)


def automation_sensors(config: Config) -> list[dg.SensorDefinition]:
    """The two sensors, RUNNING only when ``config.automation`` (``SMALLCAPS_AUTOMATION=on``)."""
    status = dg.DefaultSensorStatus.RUNNING if config.automation else dg.DefaultSensorStatus.STOPPED
    file_sensor = dg.sensor(
        name="events_file_sensor",
        minimum_interval_seconds=config.automation_interval,
        default_status=status,
        asset_selection=dg.AssetSelection.assets(MANIFEST_KEY),
        description="Hashes SMALLCAPS_EVENTS and records an observation of events_file when it changed; "
        "requests a manifest run itself only when the last manifest was built from other content and "
        "none is running (the file changed while a manifest run was reading it).",
    )(events_file_sensor)
    conditions = dg.AutomationConditionSensorDefinition(
        "smallcaps_automation",
        target=dg.AssetSelection.all(),
        minimum_interval_seconds=config.automation_interval,
        default_status=status,
        description="Evaluates the automation conditions of manifest and event_windows "
        "(SMALLCAPS_AUTOMATION=on).",
    )
    return [conditions, file_sensor]
