"""The compaction: the `compacted_windows` asset in a real Dagster instance, and its files on disk."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow.parquet as pq
from dagster_polars import PolarsParquetIOManager

from smallcaps_ingest import read
from smallcaps_ingest.core import compact, store
from smallcaps_ingest.pipeline.assets import compacted_windows, event_windows, manifest
from smallcaps_ingest.pipeline.resources import IngestSettings, PolygonResource
from smallcaps_ingest.simulator import Simulator
from smallcaps_ingest.simulator.sample import SAMPLE_EVENTS_PATH
from smallcaps_ingest_tests.conftest import TEST_KEY


def _resources(tmp_path: Path, sim: Simulator) -> dict[str, object]:
    data = tmp_path / "data"
    return {
        "io_manager": PolarsParquetIOManager(base_dir=str(data)),
        "settings": IngestSettings(data_dir=str(data), events_path=str(SAMPLE_EVENTS_PATH)),
        "polygon": PolygonResource(
            api_key=TEST_KEY, base_url=sim.base_url, max_rps=500, budget_url=f"sqlite://{tmp_path}/b.sqlite"
        ),
    }


def test_compacted_windows_asset_after_event_windows(tmp_path: Path, sim: Simulator) -> None:
    """manifest -> event_windows[XELB, BRK.B] -> compacted_windows[XELB...BRK.B] in one instance; the
    reader then takes the compacted files and returns the per-event frames."""
    resources = _resources(tmp_path, sim)
    data = tmp_path / "data"
    assets = [manifest, event_windows, compacted_windows]
    with dg.instance_for_test() as instance:
        assert dg.materialize([manifest], resources=resources, instance=instance).success
        for sym in ("BRK.B", "XELB"):
            assert dg.materialize(assets, selection=[event_windows], partition_key=sym,
                                  resources=resources, instance=instance).success
        per_event = {k: read.load_windows(data, k, symbols=["BRK.B", "XELB"]).collect() for k in read.KINDS}
        assert not any(p.compacted for p in read.plan_windows(data, "trades").pieces)
        result = dg.materialize(assets, selection=[compacted_windows], partition_key="XELB",
                                resources=resources, instance=instance)
        assert result.success
        (mat,) = result.asset_materializations_for_node("compacted_windows")
        assert mat.metadata["events"].value == 10 and mat.metadata["incomplete_events"].value == 0
        xelb_quotes = per_event["quotes"].filter(pl.col("symbol") == "XELB").height
        assert mat.metadata["quotes_rows"].value == xelb_quotes > 0
        # BRK.B not compacted yet: a mixed read
        plan = read.plan_windows(data, "quotes", symbols=["BRK.B", "XELB"])
        assert [(p.compacted, p.events["symbol"].unique().to_list()) for p in plan.pieces] == [
            (False, ["BRK.B"]), (True, ["XELB"])]
        assert dg.materialize(assets, selection=[compacted_windows], partition_key="BRK.B",
                              resources=resources, instance=instance).success
        for kind, want in per_event.items():
            plan = read.plan_windows(data, kind, symbols=["BRK.B", "XELB"])
            types = {s: set(side.types.values()) for s in ("BRK.B", "XELB")
                     if (side := compact.read_sidecar(data, s)) is not None}
            assert all(p.compacted and p.whole for p in plan.pieces)
            assert len(plan.files) == sum(map(len, types.values())) == len(set(plan.files))  # one per type
            assert read.frame(plan).collect().equals(want), kind
        assert instance.get_materialized_partitions(dg.AssetKey("compacted_windows")) == {"BRK.B", "XELB"}


def test_a_new_generation_replaces_the_old_one(tmp_path: Path, sim: Simulator) -> None:
    resources = _resources(tmp_path, sim)
    data = tmp_path / "data"
    with dg.instance_for_test() as instance:
        assert dg.materialize([manifest], resources=resources, instance=instance).success
        assert dg.materialize([manifest, event_windows], selection=[event_windows], partition_key="AAOI",
                              resources=resources, instance=instance).success
    man = pl.read_parquet(data / "manifest.parquet")
    first = compact.compact_symbol(data, "AAOI", man)
    side1 = compact.read_sidecar(data, "AAOI")
    assert side1 is not None and first.events == 20 == len(side1.events)
    for eid, fp in side1.events.items():  # the fingerprints are the per-event files' current stats
        d = store.event_dir(data, "AAOI", eid)
        assert fp == tuple(v for f in store.FILES for v in compact.stat_key(os.stat(d / f)))
    compact.compact_symbol(data, "AAOI", man)
    side2 = compact.read_sidecar(data, "AAOI")
    assert side2 is not None and side2.files != side1.files and side2.events == side1.events
    aaoi = man.filter(pl.col("symbol") == "AAOI")
    assert side2.types == dict(aaoi.select("event_id", "event_type").iter_rows())
    names = sorted(p.name for p in compact.symbol_compact_dir(data, "AAOI").iterdir())
    held = [n for by_type in side2.files.values() for n in by_type.values()]
    assert names == sorted([compact.SIDECAR, *held])  # the old generation is gone
    # one file per event type, each holding exactly that type's events, sorted by event time and
    # id; every row group carries min/max statistics, so a time filter skips row groups
    per_event = read.load_windows(data, "quotes", symbols="AAOI", use_compacted=False).collect()
    for event_type, count in side2.counts.items():
        quotes = pl.read_parquet(side2.path("quotes", event_type))
        assert quotes["event_id"].n_unique() <= count
        assert quotes["event_type"].unique().to_list() == [event_type]
        assert quotes.select(compact.ORDER).equals(quotes.select(compact.ORDER).sort(compact.ORDER))
        assert quotes.equals(per_event.filter(pl.col("event_type") == event_type).select(quotes.columns))
    metas = [pq.ParquetFile(side2.path("quotes", t)).metadata for t in side2.counts]
    meta = max(metas, key=lambda m: m.num_rows)
    stamps = meta.schema.names.index("timestamp")
    groups = [meta.row_group(i).column(stamps).statistics for i in range(meta.num_row_groups)]
    assert meta.num_row_groups == -(-meta.num_rows // compact.ROW_GROUP_ROWS)
    assert all(g.has_min_max for g in groups)
