"""The rules the package layout keeps (README, "How the code is laid out"), read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "smallcaps_ingest"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _modules(sub: str = "") -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def test_core_imports_no_dagster_ops_pipeline_or_simulator() -> None:
    banned = ("dagster", "dagster_polars", "smallcaps_ingest.ops", "smallcaps_ingest.pipeline",
              "smallcaps_ingest.simulator", "smallcaps_ingest.definitions")
    bad = {str(p.relative_to(PKG)): sorted(n for n in _imports(p) if n.split(".")[0] == "dagster"
                                           or n.startswith(banned))
           for p in _modules("core")}
    assert not {k: v for k, v in bad.items() if v}


def test_no_private_dagster_import_anywhere() -> None:
    bad = {str(p.relative_to(PKG)): sorted(n for n in _imports(p) if n.startswith("dagster._"))
           for p in _modules()}
    assert not {k: v for k, v in bad.items() if v}


def test_only_config_reads_the_environment() -> None:
    """``os.environ``/``os.getenv`` only in config.py (and the package __init__'s allocator setting,
    which must run before polars is imported)."""
    readers = set()
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
                continue
            if node.value.id == "os" and node.attr in ("environ", "getenv"):
                readers.add(str(p.relative_to(PKG)))
    assert readers == {"config.py", "__init__.py"}


def test_no_module_over_500_lines() -> None:
    long = {str(p.relative_to(PKG)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 500}
    assert not long
