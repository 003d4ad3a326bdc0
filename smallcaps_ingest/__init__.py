"""smallcaps_ingest: Polygon/Massive v3 ticks around intraday events, as a Dagster asset platform.

The core modules (simulator, events, manifest, plan, budget, fetch, shape, store, check) import
nothing from Dagster. The Dagster ``Definitions`` are built lazily on first access of ``defs`` so
that ``python -m smallcaps_ingest.simulator`` and the core tests stay light, while
``dagster ... -m smallcaps_ingest`` (which scans ``dir(module)``) still finds them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["defs"]


def __getattr__(name: str) -> Any:
    if name == "defs":
        from smallcaps_ingest.definitions import defs

        return defs
    raise AttributeError(f"module 'smallcaps_ingest' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "defs"])
