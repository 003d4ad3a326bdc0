"""Event ids as the users' old system wrote them, end to end: the type as written in the events file,
bad types refused through the CLI, and directories of other names (an earlier version's ids) reported
by ``reconcile`` as foreign and never deleted, by ``--fix`` or ``cleanup`` either."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import polars as pl
import pytest

from smallcaps_ingest.core import store
from smallcaps_ingest.simulator import Simulator
from smallcaps_ingest_tests.conftest import BIN, REPO, TEST_KEY, cli_env
from smallcaps_ingest_tests.pipeline.test_dagster import _assert_symbol_exact, _instance, materialize

NY = ZoneInfo("America/New_York")
EW = dg.AssetKey("event_windows")


def _events_file(path: Path, rows: list[tuple[str, str, datetime]]) -> Path:
    pl.DataFrame(
        {
            "symbol": [r[0] for r in rows],
            "event_type": [r[1] for r in rows],
            "timestamp": pl.Series([r[2] for r in rows], dtype=pl.Datetime("us", "America/New_York")),
        }
    ).write_parquet(path)
    return path


def _old_id(event_id: str, event_type: str) -> str:
    """The id an earlier version gave the same event: the type upper-cased, runs outside [A-Z0-9]
    turned into '-' (the hash, of the type as written, is the same)."""
    symbol, rest = event_id.split(f"_{event_type}_", 1)
    return f"{symbol}_{re.sub(r'[^A-Z0-9]+', '-', event_type.upper())}_{rest}"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "smallcaps-ingest"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def env(tmp_path: Path, sim: Simulator) -> dict[str, str]:
    events = _events_file(
        tmp_path / "events.parquet",
        [
            ("AAL", "vwap_break", datetime(2023, 9, 7, 11, 16, tzinfo=NY)),
            ("AAL", "vwap_break", datetime(2023, 9, 12, 14, 2, 30, tzinfo=NY)),
            ("TSLA", "flush", datetime(2023, 4, 20, 15, 58, tzinfo=NY)),
        ],
    )
    return cli_env(
        tmp_path,
        POLYGON_BASE_URL=sim.base_url,
        POLYGON_API_KEY=TEST_KEY,
        POLYGON_MAX_RPS="200",
        POLYGON_BUDGET_PATH=str(tmp_path / "budget.sqlite"),
        SMALLCAPS_EVENTS=str(events),
    )


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("VWAP-BREAK", "['-']"),
        ("Halt: resume", "[' ', ':']"),
        ("../etc", "['.', '/']"),
        ("_flush", "must start with a letter or digit"),
        ("x" * 41, "too long (41 characters, at most 40)"),
    ],
)
def test_bad_event_type_fails_through_the_cli_naming_row_and_value(
    tmp_path: Path, bad: str, why: str
) -> None:
    events = _events_file(
        tmp_path / "bad.parquet",
        [
            ("AAL", "vwap_break", datetime(2023, 9, 7, 11, 16, tzinfo=NY)),
            ("TSLA", bad, datetime(2023, 4, 20, 15, 58, tzinfo=NY)),
        ],
    )
    env = cli_env(tmp_path, POLYGON_BASE_URL="simulator", SMALLCAPS_EVENTS=str(events))
    proc = materialize(env, "--select", "manifest", ok=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"column 'event_type', row 1: invalid event_type {bad!r}: it " in out and why in out
    data = Path(env["SMALLCAPS_DATA_DIR"])
    assert not data.exists() or not any(data.iterdir())


def test_ids_and_directories_keep_the_type_as_written(env: dict[str, str], sim: Simulator) -> None:
    data = Path(env["SMALLCAPS_DATA_DIR"])
    materialize(env, "--select", "manifest")
    manifest = pl.read_parquet(data / "manifest.parquet")
    ids = manifest["event_id"].to_list()
    # the shape of the old system's AAL_vwap_break_20230907_151600_1a2b3c4d and
    # TSLA_flush_20230420_195800_9f8e7d6c, with the hash of symbol|event_type|timestamp-ns
    want = [
        ("AAL_vwap_break_20230907_151600_", b"AAL|vwap_break|1694099760000000000"),
        ("AAL_vwap_break_20230912_180230_", b"AAL|vwap_break|1694541750000000000"),
        ("TSLA_flush_20230420_195800_", b"TSLA|flush|1682020680000000000"),
    ]
    assert ids == [prefix + hashlib.sha256(key).hexdigest()[:8] for prefix, key in want]
    materialize(env, "--select", "event_windows", "--partition-range", "AAL...TSLA")
    for sym in ("AAL", "TSLA"):
        on_disk = sorted(p.name for p in (data / "event_windows" / f"symbol={sym}").iterdir())
        assert on_disk == [f"event={e}" for e in ids if e.startswith(f"{sym}_")]
        _assert_symbol_exact(data, sym, manifest)


def test_reconcile_reports_foreign_directories_and_nothing_deletes_them(
    env: dict[str, str], sim: Simulator
) -> None:
    data = Path(env["SMALLCAPS_DATA_DIR"])
    root = data / "event_windows"
    materialize(env, "--select", "manifest")
    materialize(env, "--select", "event_windows", "--partition-range", "AAL...TSLA")
    manifest = pl.read_parquet(data / "manifest.parquet")
    aal = manifest.filter(pl.col("symbol") == "AAL")["event_id"].to_list()
    (tsla,) = manifest.filter(pl.col("symbol") == "TSLA")["event_id"].to_list()
    # AAL as an earlier version left it: the same events under the old names (so AAL's manifest events
    # are missing); TSLA complete, plus an old-named copy and an old-named partial directory; a symbol
    # that is no longer in the manifest
    old_aal = sorted(_old_id(e, "vwap_break") for e in aal)
    assert old_aal[0].startswith("AAL_VWAP-BREAK_20230907_151600_")
    for e in aal:
        store.event_dir(data, "AAL", e).rename(store.event_dir(data, "AAL", _old_id(e, "vwap_break")))
    old_tsla = _old_id(tsla, "flush")
    shutil.copytree(store.event_dir(data, "TSLA", tsla), store.event_dir(data, "TSLA", old_tsla))
    partial = "TSLA_HALT-RESUME_20230420_150000_0badf00d"
    store.event_dir(data, "TSLA", partial).mkdir()
    shutil.copy(
        store.event_dir(data, "TSLA", tsla) / "trades.parquet", store.event_dir(data, "TSLA", partial)
    )
    gone = "GONE_NEWS_20230103_150000_deadbeef"
    shutil.copytree(store.event_dir(data, "TSLA", tsla), store.event_dir(data, "GONE", gone))
    foreign_files = {p: h for p, h in _files(root).items() if not any(e in p for e in (*aal, tsla))}
    assert len(foreign_files) == 2 * 2 + 2 + 1 + 2
    # an interrupted write's leftover inside a foreign directory: cleanup's business, the data not
    orphan = store.event_dir(data, "GONE", gone) / "quotes.parquet.tmp.123"
    orphan.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(orphan, (old, old))

    proc = _cli(env, "reconcile", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["foreign_events"] == [
        {"symbol": "AAL", "count": 2, "complete": 2, "partial": 0, "in_manifest": True, "examples": old_aal},
        {"symbol": "GONE", "count": 1, "complete": 1, "partial": 0, "in_manifest": False, "examples": [gone]},
        {
            "symbol": "TSLA",
            "count": 2,
            "complete": 1,
            "partial": 1,
            "in_manifest": True,
            "examples": sorted([old_tsla, partial]),
        },
    ]
    assert res["foreign_events_total"] == 5
    assert [(r["symbol"], r["done"], r["missing"]) for r in res["materialized_incomplete"]] == [("AAL", 0, 2)]

    text = _cli(env, "reconcile")
    assert text.returncode == 0, text.stderr
    assert "foreign event directories: 5 under 3 symbol(s)" in text.stdout
    assert f"  AAL: 2 (2 complete, 0 partial), e.g. {old_aal[0]}, {old_aal[1]}" in text.stdout
    assert f"  GONE: 1 (1 complete, 0 partial, symbol not in the manifest), e.g. {gone}" in text.stdout
    assert "disk and instance agree" not in text.stdout

    fixed = _cli(env, "reconcile", "--fix")
    assert fixed.returncode == 0, fixed.stderr
    cleaned = _cli(env, "cleanup", "--grace-minutes", "0", "--json")
    assert cleaned.returncode == 0, cleaned.stderr
    assert [r["path"] for r in json.loads(cleaned.stdout)["removed"]] == [str(orphan.relative_to(data))]
    assert {p: h for p, h in _files(root).items() if p in foreign_files} == foreign_files

    # re-materializing fetches the events under their new names; the foreign directories stay
    materialize(env, "--select", "event_windows", "--partition", "AAL")
    _assert_symbol_exact(data, "AAL", manifest)
    assert {p: h for p, h in _files(root).items() if p in foreign_files} == foreign_files
    after = json.loads(_cli(env, "reconcile", "--json").stdout)
    assert after["materialized_incomplete"] == [] and after["foreign_events_total"] == 5
    assert "AAL" in _instance(env).get_materialized_partitions(EW)
