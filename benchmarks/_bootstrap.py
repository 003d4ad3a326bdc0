"""Make ``smallcaps_ingest`` importable when a benchmark runs as ``python benchmarks/X.py``
from a checkout whose package is not pip-installed (``make install`` installs it editable)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import smallcaps_ingest  # noqa: F401
except ModuleNotFoundError:
    sys.path.insert(0, str(ROOT))
