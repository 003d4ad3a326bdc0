"""smallcaps_ingest: Polygon/Massive v3 ticks around intraday events, as a Dagster asset platform.

The core modules (simulator, events, manifest, plan, polygon, engine, shape, store, check) import
nothing from Dagster. The Dagster ``Definitions`` are built lazily on first access of ``defs`` so
that ``python -m smallcaps_ingest.simulator`` and the core tests stay light, while
``dagster ... -m smallcaps_ingest`` (which scans ``dir(module)``) still finds them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# polars allocates through its own jemalloc, which by default keeps freed pages per arena (dirty for
# 0.5 s, then "muzzy" for 1 s more). Frames here are short-lived and allocated on a dozen threads,
# so one arena and a faster return cut ~20 MB of a 12-worker run's peak RSS at no measured CPU
# cost; returning pages at once (dirty 0) cut ~15 MB more but cost ~25 % more CPU in polars
# (benchmarks/README.md). polars appends this variable to its own settings when first imported,
# so it only takes effect before that; a user's value wins.
if "polars" not in sys.modules:
    os.environ.setdefault("_RJEM_MALLOC_CONF", "narenas:1,dirty_decay_ms:100,muzzy_decay_ms:0")

__all__ = ["defs"]


def __getattr__(name: str) -> Any:
    if name == "defs":
        from smallcaps_ingest.definitions import defs

        return defs
    raise AttributeError(f"module 'smallcaps_ingest' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "defs"])
