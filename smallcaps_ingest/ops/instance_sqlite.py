"""A read-only view of a default (SQLite) Dagster instance that does not import Dagster.

``import dagster`` plus ``DagsterInstance.get()`` cost about a second of CPU here, more than the
rest of ``smallcaps-ingest status`` together; the handful of queries status needs take a few
milliseconds of SQL. So for the common instance -- ``$DAGSTER_HOME`` with the default SQLite
storage, of the Dagster version this was written against -- status reads the two SQLite files
directly, with the same SQL Dagster 1.13 runs (``SqlEventLogStorage`` / ``SqlRunStorage``).

Anything unexpected -- another storage (Postgres, legacy per-storage config, a custom instance
class), another Dagster minor version or schema revision, a missing database, an event or run that
does not parse as the shapes below -- makes :func:`open_view` return None (or a query raise
:class:`Unsupported`), and status falls back to the Dagster API, which is always right. A test
compares the two on real instances.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib.util import find_spec
from typing import Any
from urllib.parse import quote

DAGSTER_MINOR = "1.13."  # the version whose SQL and serialization this mirrors
# alembic heads of the run storage and the event log index shard in Dagster 1.13 (a test pins them)
ALEMBIC_REVISIONS = frozenset({"29b539ebc72a"})
MATERIALIZATION = "ASSET_MATERIALIZATION"
ASSET_KEY_INDEX_COLS = "asset_key_index_columns"
# instance config keys that move or replace the storage status reads: with any of them, use Dagster
_STORAGE_KEYS = (
    "instance_class",
    "local_artifact_storage",
    "run_storage",
    "event_log_storage",
    "schedule_storage",
)
Row = tuple[int, float, str | None, str, dict[str, Any]]  # id, timestamp, partition, run id, metadata


class Unsupported(RuntimeError):
    """Something this view does not mirror exactly: use the Dagster API instead."""


def dagster_version() -> str | None:
    """The installed Dagster version, read from its version.py without importing the package."""
    try:
        spec = find_spec("dagster")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        try:
            with open(os.path.join(loc, "version.py")) as fh:
                for line in fh:
                    if line.startswith("__version__"):
                        return line.split("=", 1)[1].strip().strip("\"'")
        except OSError:
            continue
    return None


def _storage_base(home: str) -> str | None:
    """The SQLite storage base dir the instance at ``home`` uses, or None when it is not the default."""
    path = os.path.join(home, "dagster.yaml")
    config: Any = {}
    if os.path.exists(path):
        try:
            import yaml

            with open(path) as fh:
                config = yaml.safe_load(fh) or {}
        except Exception:  # noqa: BLE001 - any doubt: Dagster reads it (and reports its errors)
            return None
    if not isinstance(config, dict) or any(k in config for k in _STORAGE_KEYS):
        return None
    storage = config.get("storage")
    if storage is None:
        return home
    if not isinstance(storage, dict) or set(storage) != {"sqlite"}:
        return None
    sq = storage["sqlite"]
    if not isinstance(sq, dict) or set(sq) != {"base_dir"}:
        return None
    base = sq["base_dir"]
    if isinstance(base, dict) and set(base) == {"env"}:
        base = os.environ.get(str(base["env"]))
    if not isinstance(base, str) or not os.path.isabs(base):
        return None
    return base


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=15.0)
    conn.execute("BEGIN")  # one snapshot for every query on this file
    return conn


def _revision(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def open_view(home: str | None = None) -> SqliteInstanceView | None:
    """The view of ``$DAGSTER_HOME``'s instance, or None when status must ask Dagster. Never raises."""
    raw = os.environ.get("DAGSTER_HOME", "") if home is None else home
    if not raw:
        return None
    home = os.path.expanduser(raw)
    if not os.path.isabs(home) or not os.path.isdir(home):
        return None
    version = dagster_version()
    if version is None or not version.startswith(DAGSTER_MINOR):
        return None
    base = _storage_base(home)
    if base is None:
        return None
    runs_db = os.path.join(base, "history", "runs.db")
    index_db = os.path.join(base, "history", "runs", "index.db")
    if not (os.path.isfile(runs_db) and os.path.isfile(index_db)):
        return None  # Dagster would create (and migrate) them on open
    try:
        runs, index = _connect(runs_db), _connect(index_db)
    except sqlite3.Error:
        return None
    try:
        if _revision(runs) not in ALEMBIC_REVISIONS or _revision(index) not in ALEMBIC_REVISIONS:
            raise Unsupported("schema revision")
        row = index.execute(
            "SELECT 1 FROM secondary_indexes WHERE name = ? AND migration_completed IS NOT NULL LIMIT 1",
            (ASSET_KEY_INDEX_COLS,),
        ).fetchone()
        if row is None:
            raise Unsupported("asset key index columns not migrated")
    except (sqlite3.Error, Unsupported):
        runs.close()
        index.close()
        return None
    return SqliteInstanceView(home, runs, index)


def _key_string(asset: str) -> str:
    """``AssetKey([asset]).to_string()``."""
    return json.dumps([asset])


def _db_datetime(ts: float) -> str:
    """A timestamp as Dagster's SQLite columns hold it (naive UTC, SQLAlchemy's DATETIME text form)."""
    d = datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)
    return d.strftime("%Y-%m-%d %H:%M:%S.") + f"{d.microsecond:06d}"


def _plain(value: Any) -> bool:
    """JSON that Dagster's serdes leaves as it is (no ``__class__``-style packed objects inside)."""
    if isinstance(value, dict):
        return all(not str(k).startswith("__") and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return True


# serialized metadata value class -> the field that its ``.value`` property returns
_VALUE_FIELDS = {
    "IntMetadataEntryData": "value",
    "FloatMetadataEntryData": "value",
    "BoolMetadataEntryData": "value",
    "TimestampMetadataValue": "value",
    "TextMetadataEntryData": "text",
    "UrlMetadataEntryData": "url",
    "PathMetadataEntryData": "path",
    "NotebookMetadataEntryData": "path",
    "MarkdownMetadataEntryData": "md_str",
    "JsonMetadataEntryData": "data",
}


def metadata_value(packed: Any) -> Any:
    """What ``MetadataValue.value`` returns for one serialized value; Unsupported for other classes."""
    if not isinstance(packed, dict):
        raise Unsupported(f"metadata value {packed!r}")
    cls = packed.get("__class__")
    if cls == "NullMetadataEntryData":
        return None
    field = _VALUE_FIELDS.get(cls)  # type: ignore[arg-type]
    if field is None or field not in packed:
        raise Unsupported(f"metadata value class {cls}")
    value = packed[field]
    if cls == "MarkdownMetadataEntryData" and value is None:
        return ""
    if cls == "JsonMetadataEntryData" and not _plain(value):
        raise Unsupported("packed objects inside JSON metadata")
    return value


def materialization_row(
    storage_id: int, event_json: str
) -> tuple[int, float, str | None, str, dict[str, Any]]:
    """(storage id, timestamp, partition, run id, metadata label -> value) of one stored event."""
    try:
        entry = json.loads(event_json)
        if entry.get("__class__") != "EventLogEntry":
            raise Unsupported("not an EventLogEntry")
        dagster_event = entry["dagster_event"]
        data = dagster_event["event_specific_data"]
        if data.get("__class__") != "StepMaterializationData":
            raise Unsupported("not a materialization")
        mat = data["materialization"]
        if mat.get("__class__") != "AssetMaterialization":
            raise Unsupported("not an AssetMaterialization")
        md: dict[str, Any] = {}
        if "metadata_entries" in mat:
            for e in mat["metadata_entries"] or ():
                if not isinstance(e, dict) or e.get("__class__") != "EventMetadataEntry":
                    raise Unsupported("metadata entry")
                md[e["label"]] = e["entry_data"]
        elif isinstance(mat.get("metadata"), dict):
            md = dict(mat["metadata"])
        else:
            raise Unsupported("no metadata field")
        return (
            storage_id,
            float(entry["timestamp"]),
            mat.get("partition"),
            entry.get("run_id") or "",
            md,  # still serialized: values are read with metadata_value() when needed
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Unsupported(f"event {storage_id}: {type(e).__name__}: {e}") from None


class SqliteInstanceView:
    """The few reads status makes, as Dagster 1.13 makes them on its SQLite storage."""

    def __init__(self, home: str, runs: sqlite3.Connection, index: sqlite3.Connection):
        self.root_directory = home
        self._runs = runs
        self._index = index

    def close(self) -> None:
        self._runs.close()
        self._index.close()

    # --- event log index shard -------------------------------------------------------------------
    def get_dynamic_partitions(self, name: str) -> list[str]:
        rows = self._index.execute(
            "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = ? ORDER BY id", (name,)
        ).fetchall()
        return [r[0] for r in rows]

    def last_wipe_timestamp(self, asset: str) -> float | None:
        """``AssetDetails.last_wipe_timestamp`` of the asset's row (None: never wiped, or no row)."""
        row = self._index.execute(
            "SELECT asset_details FROM asset_keys WHERE asset_key = ?", (_key_string(asset),)
        ).fetchone()
        if row is None or not row[0]:
            return None
        try:
            details = json.loads(row[0])
        except ValueError as e:
            raise Unsupported(f"asset details: {e}") from None
        if not isinstance(details, dict) or details.get("__class__") != "AssetDetails":
            raise Unsupported("asset details")
        wipe = details.get("last_wipe_timestamp")
        return float(wipe) if wipe else None

    def _wipe_clause(self, asset: str) -> tuple[str, tuple[Any, ...]]:
        wipe = self.last_wipe_timestamp(asset)
        return (" AND timestamp > ?", (_db_datetime(wipe),)) if wipe else ("", ())

    def get_materialized_partitions(self, asset: str) -> set[str]:
        clause, params = self._wipe_clause(asset)
        rows = self._index.execute(
            "SELECT partition, max(id) FROM event_logs WHERE asset_key = ? AND partition IS NOT NULL "
            f"AND dagster_event_type = ?{clause} GROUP BY partition",
            (_key_string(asset), MATERIALIZATION, *params),
        ).fetchall()
        return {r[0] for r in rows}

    def materializations(
        self,
        asset: str,
        *,
        after_timestamp: float | None = None,
        after_storage_id: int | None = None,
        limit: int | None = None,
        ascending: bool = False,
    ) -> list[Row]:
        """``fetch_materializations(AssetRecordsFilter(...), ascending=...)``, paged to ``limit``."""
        clause, params = self._wipe_clause(asset)
        sql = f"SELECT id, event FROM event_logs WHERE dagster_event_type = ? AND asset_key = ?{clause}"
        args: list[Any] = [MATERIALIZATION, _key_string(asset), *params]
        if after_storage_id is not None:
            sql += " AND id > ?"
            args.append(after_storage_id)
        if after_timestamp:  # Dagster tests truthiness here, so 0.0 means no filter
            sql += " AND timestamp > ?"
            args.append(_db_datetime(after_timestamp))
        sql += f" ORDER BY id {'ASC' if ascending else 'DESC'}"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [materialization_row(i, ev) for i, ev in self._index.execute(sql, args)]

    def asset_marks(self, asset: str) -> tuple[bool, float | None, int | None]:
        """(has a visible asset record, its last wipe timestamp, its last materialization storage id)."""
        row = self._index.execute(
            "SELECT asset_details FROM asset_keys WHERE asset_key = ? AND (wipe_timestamp IS NULL OR "
            "last_materialization_timestamp > wipe_timestamp)",
            (_key_string(asset),),
        ).fetchone()
        if row is None:
            return False, None, None
        wipe = self.last_wipe_timestamp(asset)
        clause, params = self._wipe_clause(asset)
        last = self._index.execute(
            f"SELECT max(id) FROM event_logs WHERE asset_key = ? AND dagster_event_type = ?{clause}",
            (_key_string(asset), MATERIALIZATION, *params),
        ).fetchone()
        return True, wipe, (int(last[0]) if last and last[0] is not None else None)

    # --- run storage -----------------------------------------------------------------------------
    def run_records(self, statuses: Sequence[str]) -> list[dict[str, Any]]:
        """``get_run_records(RunsFilter(statuses=...))``, newest first, as the fields status reads."""
        if not statuses:
            return []
        marks = ", ".join("?" for _ in statuses)
        rows = self._runs.execute(
            f"SELECT run_body, status, create_timestamp FROM runs WHERE status IN ({marks}) ORDER BY id DESC",
            tuple(statuses),
        ).fetchall()
        return [_run(body, status, created) for body, status, created in rows]


def _asset_names(packed: Any) -> list[str] | None:
    """A serialized frozenset of AssetKeys as user strings (``a/b``); None for null."""
    if packed is None:
        return None
    if not isinstance(packed, dict) or set(packed) != {"__frozenset__"}:
        raise Unsupported("asset selection")
    out = []
    for k in packed["__frozenset__"]:
        if not isinstance(k, dict) or k.get("__class__") != "AssetKey":
            raise Unsupported("asset key")
        out.append("/".join(k["path"]))
    return out


def _run(body: str, status: str, created: str) -> dict[str, Any]:
    try:
        run = json.loads(body)
        if run.get("__class__") not in ("PipelineRun", "DagsterRun"):
            raise Unsupported("not a run")
        checks = run.get("asset_check_selection")
        if checks is not None and (not isinstance(checks, dict) or set(checks) != {"__frozenset__"}):
            raise Unsupported("asset check selection")
        created_dt = datetime.fromisoformat(created).replace(tzinfo=UTC)
        return {
            "run_id": run["run_id"],
            "job_name": run.get("pipeline_name"),
            "status": status,
            "created": created_dt.isoformat(),
            "asset_selection": _asset_names(run.get("asset_selection")),
            "has_check_selection": bool(checks and checks["__frozenset__"]),
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Unsupported(f"run: {type(e).__name__}: {e}") from None


def value_of(md: Mapping[str, Any], key: str) -> Any:
    """The ``.value`` of one serialized metadata entry (None when absent)."""
    packed = md.get(key)
    return None if packed is None else metadata_value(packed)


def keys_in(md: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: value_of(md, k) for k in keys if k in md}
