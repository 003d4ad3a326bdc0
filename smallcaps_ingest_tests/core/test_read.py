"""smallcaps_ingest.read on trees written by the real pipeline (FetchEngine) against the simulator.

Expected frames are built independently: the simulator's ground truth shaped per event (what the
files must hold), or each event's files read one by one, with the event columns from the manifest
and ``t_rel`` from integer nanoseconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import polars as pl
import pytest

from smallcaps_ingest import read
from smallcaps_ingest.core import compact, shape, store
from smallcaps_ingest.core.engine import FetchEngine, windows_from_frame
from smallcaps_ingest.core.manifest import build_manifest
from smallcaps_ingest.core.polygon.budget import RequestBudget
from smallcaps_ingest.core.polygon.client import PolygonClient
from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest.simulator.sample import SAMPLE_EVENTS_PATH
from smallcaps_ingest_tests.conftest import TEST_KEY, truth_frame

SYMBOLS = ["AAOI", "BRK.B", "XELB"]
EV = read.EVENT_COLUMNS


def _events() -> pl.DataFrame:
    """The sample's events of SYMBOLS plus one DEAD event (no prints: empty files), their times
    moved by sub-microsecond amounts so that t_rel must be exact to the nanosecond."""
    ev = pl.read_parquet(SAMPLE_EVENTS_PATH).filter(pl.col("symbol").is_in(SYMBOLS))
    ev = ev.with_columns(pl.col("timestamp").dt.convert_time_zone("UTC").dt.cast_time_unit("ns"))
    dead = pl.DataFrame({"symbol": ["DEAD"], "event_type": ["news"],
                         "timestamp": [datetime(2024, 3, 5, 15, 0, tzinfo=UTC)], "score": [1.0]})
    ev = pl.concat([ev, dead.with_columns(pl.col("timestamp").dt.cast_time_unit("ns"))], how="vertical")
    nudge = pl.int_range(0, ev.height) * 7_654_321 + 89
    return ev.with_columns(pl.col("timestamp") + pl.duration(nanoseconds=nudge))


def _fetch(data: Path, manifest: pl.DataFrame, hz: float, symbols: list[str]) -> None:
    with Simulator(SimConfig()) as sim:
        budget = RequestBudget(500, data.parent / f"budget_{data.name}.sqlite")
        client = PolygonClient(sim.base_url, TEST_KEY, budget, workers=8, read_timeout=10)
        try:
            work = {s: windows_from_frame(manifest.filter(pl.col("symbol") == s)) for s in symbols}
            outcomes = FetchEngine(client, str(data), workers=8, hz=hz).run(work)
            assert all(o.error is None and o.complete == o.events_total for o in outcomes)
        finally:
            client.close()
            budget.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    """One tree for the module, written by the real pipeline; tests work on copies."""
    data = tmp_path_factory.mktemp("read") / "data"
    manifest, _ = build_manifest(_events())
    data.mkdir()
    manifest.write_parquet(data / "manifest.parquet")
    _fetch(data, manifest, 1.0, [*SYMBOLS, "DEAD"])
    return data, manifest


@pytest.fixture
def tree(pristine: tuple[Path, pl.DataFrame], tmp_path: Path) -> Iterator[tuple[Path, pl.DataFrame]]:
    data = tmp_path / "data"
    shutil.copytree(pristine[0], data)
    yield data, pristine[1]


def _ordered(manifest: pl.DataFrame) -> pl.DataFrame:
    return manifest.select(EV).sort(read.ORDER)


def _one_by_one(data: Path, manifest: pl.DataFrame, kind: str, time_col: str) -> pl.DataFrame:
    """Each event's file read alone, the manifest's event columns added, t_rel from integers."""
    parts = []
    for row in _ordered(manifest).iter_rows(named=True):
        f = store.event_dir(data, row["symbol"], row["event_id"]) / f"{kind}.parquet"
        df = pl.read_parquet(f)
        ev_ns = manifest.filter(pl.col("event_id") == row["event_id"])["timestamp"].dt.epoch("ns").item()
        t_rel = pl.Series("t_rel", [t - ev_ns for t in df[time_col].dt.epoch("ns").to_list()], pl.Int64)
        parts.append(df.select(
            *[pl.lit(row[c]).alias(c) for c in EV if c != "timestamp"],
            pl.lit(ev_ns).cast(pl.Datetime("ns", "UTC")).alias("timestamp"),
            t_rel.cast(pl.Duration("ns")),
            pl.all(),
        ).select(*EV, "t_rel", *df.columns))
    return pl.concat(parts, how="vertical")


def test_trades_equal_the_simulator_truth_per_event_and_t_rel_is_exact(tree) -> None:  # type: ignore[no-untyped-def]
    data, manifest = tree
    got = read.load_windows(data, "trades").collect()
    want = []
    ns = manifest.select("event_id", *(pl.col(c).dt.epoch("ns") for c in ("timestamp", "ts_start", "ts_end")))
    bounds = {e: (t, lo, hi) for e, t, lo, hi in ns.iter_rows()}
    for symbol, eid in _ordered(manifest).select("symbol", "event_id").iter_rows():
        ev_ns, lo, hi = bounds[eid]
        trades = shape.shape_trades(truth_frame("trades", symbol, lo, hi), lo, hi)
        want.append(pl.DataFrame({
            "event_id": [eid] * trades.height,
            "t_rel_ns": [t - ev_ns for t in trades["sip_timestamp"].dt.epoch("ns").to_list()],
        }, schema={"event_id": pl.String, "t_rel_ns": pl.Int64}).hstack(trades))
    want_df = pl.concat(want, how="vertical")
    assert got.height == want_df.height > 20_000
    assert got.schema["t_rel"] == pl.Duration("ns")
    assert got.select("event_id", *shape.TRADES_SCHEMA).equals(want_df.drop("t_rel_ns"))
    t_rel = got["t_rel"].dt.total_nanoseconds()
    assert t_rel.equals(want_df["t_rel_ns"], check_names=False)
    assert (t_rel % 1000 != 0).mean() > 0.9  # sub-microsecond parts present: a us cast would break this
    assert t_rel.min() < 0 < t_rel.max()  # rows before and after their event
    # DEAD's event is complete with zero rows: selected, contributes nothing
    assert "DEAD" in read.plan_windows(data, "trades").events["symbol"].to_list()


def test_frames_equal_reading_each_event_file(tree) -> None:  # type: ignore[no-untyped-def]
    data, manifest = tree
    for kind, time_col in (("trades", "sip_timestamp"), ("quotes", "ts")):
        got = read.load_windows(data, kind, use_compacted=False).collect()
        assert got.equals(_one_by_one(data, manifest, kind, time_col)), kind
        assert list(got.columns[:6]) == [*EV, "t_rel"]


def test_raw_quotes_t_rel_uses_sip_timestamp(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    manifest, _ = build_manifest(_events().filter(pl.col("symbol") == "XELB"))
    manifest.write_parquet(data / "manifest.parquet")
    _fetch(data, manifest, 0.0, ["XELB"])
    got = read.load_windows(data, "quotes").collect()
    assert "ts" not in got.columns and got.height > 0
    assert got.equals(_one_by_one(data, manifest, "quotes", "sip_timestamp"))


def test_filters_select_files_before_opening_any(tree) -> None:  # type: ignore[no-untyped-def]
    data, manifest = tree
    lo, hi = datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 5, 1, tzinfo=UTC)
    filters = dict(symbols=["AAOI", "XELB"], event_types=["news", "volume_spike"], start=lo, end=hi,
                   sessions=["RTH", "PM"])
    want = manifest.filter(
        pl.col("symbol").is_in(["AAOI", "XELB"]) & pl.col("event_type").is_in(["news", "volume_spike"])
        & (pl.col("timestamp") >= lo) & (pl.col("timestamp") < hi) & pl.col("session").is_in(["RTH", "PM"])
    )
    assert 3 <= want.height < manifest.height // 3
    plan = read.plan_windows(data, "quotes", **filters)
    assert plan.files == [str(store.event_dir(data, s, e) / "quotes.parquet")
                          for s, e in _ordered(want).select("symbol", "event_id").iter_rows()]
    expected = read.load_windows(data, "quotes", **filters).collect()
    assert expected.equals(_one_by_one(data, want, "quotes", "ts"))
    # every data file outside the filter is garbage now: the filtered load never opens one
    inside = set(plan.files)
    spoiled = 0
    for f in store.windows_root(data).rglob("quotes.parquet"):
        if str(f) not in inside:
            f.write_bytes(b"not parquet")
            spoiled += 1
    assert spoiled == manifest.height - want.height
    assert read.load_windows(data, "quotes", **filters).collect().equals(expected)
    with pytest.raises(pl.exceptions.ComputeError):  # the unfiltered load does open them
        read.load_windows(data, "quotes").collect()


def test_compacted_files_give_identical_frames(tree) -> None:  # type: ignore[no-untyped-def]
    data, manifest = tree
    cases = [dict(), dict(event_types="news"), dict(symbols="BRK.B", sessions="RTH"),
             dict(start=datetime(2024, 3, 1, tzinfo=UTC), end=datetime(2024, 4, 1, tzinfo=UTC))]
    per_event = {(k, i): read.load_windows(data, k, **c).collect()
                 for k in read.KINDS for i, c in enumerate(cases)}
    for s in [*SYMBOLS, "DEAD"]:
        res = compact.compact_symbol(data, s, manifest)
        assert res.events == manifest.filter(pl.col("symbol") == s).height and res.incomplete == 0
    for (kind, i), want in per_event.items():
        plan = read.plan_windows(data, kind, **cases[i])
        assert plan.pieces and all(p.compacted for p in plan.pieces)
        assert all("/compacted/" in f for f in plan.files)
        got = read.frame(plan).collect()
        assert got.equals(want), (kind, cases[i])
    cols = ["price", "size"]
    assert read.load_windows(data, "trades", columns=cols).collect().equals(
        read.load_windows(data, "trades", columns=cols, use_compacted=False).collect())
    # a selection of whole types reads whole files, unfiltered; a time range filters the files
    assert all(p.whole for p in read.plan_windows(data, "quotes", event_types="news").pieces)
    ranged = read.plan_windows(data, "quotes", **cases[3]).pieces
    assert not all(p.whole for p in ranged)
    assert any(p.by_time for p in ranged)  # no event left out shares a time: the times pick the rows
    # one file per (symbol, event type), sorted by event time, id, then each file's own order;
    # every row group carries min/max statistics
    pq = __import__("pyarrow.parquet", fromlist=["x"])
    plan = read.plan_windows(data, "quotes", symbols="AAOI")
    types = manifest.filter(pl.col("symbol") == "AAOI")["event_type"].unique().sort().to_list()
    assert len(plan.files) == len(types) and len(set(plan.files)) == len(types)
    for f, event_type in zip(plan.files, types, strict=True):
        rows = pl.read_parquet(f)
        assert rows["event_type"].unique().to_list() == [event_type]
        assert rows.select(read.ORDER).equals(rows.select(read.ORDER).sort(read.ORDER))
        assert pq.ParquetFile(f).metadata.row_group(0).column(0).statistics.has_min_max


def test_stale_compaction_falls_back_to_per_event_files(tree) -> None:  # type: ignore[no-untyped-def]
    data, manifest = tree
    for s in SYMBOLS:
        compact.compact_symbol(data, s, manifest)
    # one AAOI event re-fetched after the compaction (a rewrite by rename, as every writer does)
    eid = manifest.filter(pl.col("symbol") == "AAOI")["event_id"][3]
    f = store.event_dir(data, "AAOI", eid) / "trades.parquet"
    old = pl.read_parquet(f)
    store.atomic_write_parquet(old.head(old.height - 1), f)
    plan = read.plan_windows(data, "trades")
    modes = {p.events["symbol"][0]: p.compacted for p in plan.pieces}
    assert modes == {"AAOI": False, "BRK.B": True, "DEAD": False, "XELB": True}  # DEAD: never compacted
    got = read.frame(plan).collect()
    assert got.equals(read.load_windows(data, "trades", use_compacted=False).collect())
    assert got.filter(pl.col("event_id") == eid).height == old.height - 1
    # an event added to the manifest (and fetched) after the compaction: XELB falls back too
    hour = pl.duration(hours=1, time_unit="ns")
    extra = manifest.filter(pl.col("symbol") == "XELB").head(1).with_columns(
        *(pl.col(c) + hour for c in ("timestamp", "ts_start", "ts_end")),
        pl.lit("XELB_EXTRA_1").alias("event_id"))
    grown = pl.concat([manifest, extra], how="vertical")
    grown.write_parquet(data / "manifest.parquet")
    _fetch(data, grown, 1.0, ["XELB"])
    plan = read.plan_windows(data, "quotes", symbols="XELB")
    assert not plan.pieces[0].compacted and "XELB_EXTRA_1" in plan.events["event_id"].to_list()
    compact.compact_symbol(data, "XELB", grown)  # compacting again makes it fresh
    assert read.plan_windows(data, "quotes", symbols="XELB").pieces[0].compacted


def test_an_event_left_out_at_a_selected_events_time_is_told_apart_by_its_id(tree) -> None:  # type: ignore[no-untyped-def]
    """Events of one type, compacted, then two made incomplete (a file removed): AAOI's at T+2h,
    and XELB's at T, the time of an AAOI event still selected. Alone, each file is read by the
    selected times; together, XELB's is read by id (the piece's times hold T), never its rows."""
    data, manifest = tree
    first = manifest.filter(pl.col("symbol") == "AAOI").sort("timestamp").head(1)
    etype = first["event_type"].item()
    hour = pl.duration(hours=1, time_unit="ns")
    at = pl.lit(first["timestamp"].dt.epoch("ns").item()).cast(first.schema["timestamp"])

    def event(symbol: str, eid: str, hours: int) -> pl.DataFrame:
        row = manifest.filter(pl.col("symbol") == symbol).head(1)
        spans = ((pl.col(c) - pl.col("timestamp") + at + hours * hour).cast(manifest.schema[c])
                 for c in ("ts_start", "ts_end"))
        when = (at + hours * hour).cast(manifest.schema["timestamp"])
        return row.with_columns(*spans, when.alias("timestamp"), pl.lit(etype).alias("event_type"),
                                pl.lit(eid).alias("event_id"))

    added = [event("AAOI", "AAOI_LATER_2", 2), event("XELB", "XELB_TWIN_0", 0),
             event("XELB", "XELB_LATER_1", 1)]
    grown = pl.concat([manifest, *(e.select(manifest.columns) for e in added)], how="vertical")
    grown.write_parquet(data / "manifest.parquet")
    _fetch(data, grown, 1.0, ["AAOI", "XELB"])
    for s in ("AAOI", "XELB"):
        assert compact.compact_symbol(data, s, grown).events == grown.filter(pl.col("symbol") == s).height
    for eid in ("AAOI_LATER_2", "XELB_TWIN_0"):
        (store.event_dir(data, eid.split("_")[0], eid) / "quotes.parquet").unlink()
    cases = {("AAOI",): [(True, False, True)], ("XELB",): [(True, False, True)],
             ("AAOI", "XELB"): [(True, False, True), (True, False, False)]}
    for symbols, pieces in cases.items():
        only = dict(symbols=list(symbols), event_types=etype)
        for kind in read.KINDS:
            plan = read.plan_windows(data, kind, **only)  # type: ignore[arg-type]
            assert plan.missing == [e for e in ("AAOI_LATER_2", "XELB_TWIN_0") if e[:4] in symbols]
            assert [(p.compacted, p.whole, p.by_time) for p in plan.pieces] == pieces
            got = read.frame(plan).collect()
            assert got.equals(read.load_windows(data, kind, **only, use_compacted=False).collect())  # type: ignore[arg-type]
            assert not set(plan.missing) & set(got["event_id"].to_list())


def test_on_missing_raise_names_the_incomplete_events(tree) -> None:  # type: ignore[no-untyped-def]
    data, manifest = tree
    ids = manifest.filter(pl.col("symbol") == "BRK.B")["event_id"].to_list()
    (store.event_dir(data, "BRK.B", ids[1]) / "quotes.parquet").unlink()  # partial
    shutil.rmtree(store.event_dir(data, "BRK.B", ids[5]))  # missing
    with pytest.raises(read.IncompleteEventsError) as err:
        read.load_windows(data, "trades", symbols="BRK.B", on_missing="raise")
    assert err.value.event_ids == [e for e in _ordered(manifest)["event_id"] if e in (ids[1], ids[5])]
    assert ids[1] in str(err.value) and ids[5] in str(err.value) and "2 selected event(s)" in str(err.value)
    got = read.load_windows(data, "trades", symbols="BRK.B").collect()  # skip: the complete ones only
    rest = manifest.filter(pl.col("symbol") == "BRK.B", ~pl.col("event_id").is_in([ids[1], ids[5]]))
    assert got.equals(_one_by_one(data, rest, "trades", "sip_timestamp"))
    # a compaction made before the loss still gives the same frame (the lost events are left out)
    compact.compact_symbol(data, "BRK.B", manifest)
    assert read.load_windows(data, "trades", symbols="BRK.B").collect().equals(got)


def test_bad_arguments_name_the_problem(tree) -> None:  # type: ignore[no-untyped-def]
    data, _ = tree
    with pytest.raises(ValueError, match="kind='ticks'"):
        read.load_windows(data, "ticks")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"column\(s\) \['nope'\]"):
        read.load_windows(data, "trades", columns=["price", "nope"])
    with pytest.raises(ValueError, match="time zone"):
        read.load_windows(data, "trades", start=datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="unknown session"):
        read.load_windows(data, "trades", sessions="LUNCH")
    with pytest.raises(ValueError, match="on_missing"):
        read.load_windows(data, "trades", on_missing="ignore")  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="a local directory or an s3:// URL"):
        read.load_windows("gs://bucket/tree", "trades")  # s3:// is read (e2e/test_s3.py)
    with pytest.raises(FileNotFoundError, match="manifest"):
        read.load_windows(data / "nowhere", "trades")
    empty = read.load_windows(data, "quotes", symbols="NOPE").collect()
    assert empty.height == 0 and empty.columns[:6] == [*EV, "t_rel"]


def _norm(df: pl.DataFrame, key: list[str]) -> pl.DataFrame:
    """Datetimes as integer ns (DuckDB names the zone Etc/UTC), rows sorted on a unique key."""
    return df.with_columns(pl.col(pl.Datetime).dt.epoch("ns")).sort(key, maintain_order=True)


def test_duckdb_views_return_the_same_rows(tree) -> None:  # type: ignore[no-untyped-def]
    data, manifest = tree
    compact.compact_symbol(data, "AAOI", manifest)  # a mixed tree: one symbol compacted
    con = read.duckdb_connect(data, duckdb.connect())
    assert con.sql("SELECT count(*) FROM events").fetchall()[0][0] == manifest.height
    for kind in read.KINDS:
        want = read.load_windows(data, kind).collect()
        got = con.sql(f"SELECT * FROM {kind}").pl()
        key = ["event_id", "ts" if kind == "quotes" else "sip_timestamp", "sequence_number"]

        want_n = _norm(want, key).with_columns(
            pl.col("t_rel").dt.total_nanoseconds().alias("t_rel_ns")).drop("t_rel")
        got_n = _norm(got, key).select(want_n.columns)
        assert got_n.equals(want_n), kind
    aaoi = con.sql("SELECT count(*) FROM trades WHERE symbol = 'AAOI' AND t_rel_ns < 0").fetchall()[0][0]
    assert aaoi == read.load_windows(data, "trades", symbols="AAOI").filter(
        pl.col("t_rel") < pl.duration(nanoseconds=0)).collect().height > 0


def test_the_reader_imports_neither_dagster_nor_duckdb() -> None:
    code = "import sys, smallcaps_ingest.read; print(sorted({'dagster', 'duckdb'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
