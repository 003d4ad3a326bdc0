"""The tree on S3 (issue 20): the real CLI against the simulator, the tree in a bucket of moto's
S3-compatible server on loopback (``s3_helpers``), configured only by the AWS_* variables.

The same end-to-end path as on local disk (manifest, a partition range, every file exact against the
ground truth, the checks), then status (default and ``--verify``), the report, cleanup, reconcile and
``load_windows``; resume re-requests nothing complete; a SIGKILL mid-run leaves no partial event
visible as complete and no temporary object.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from smallcaps_ingest import storage
from smallcaps_ingest.core import store
from smallcaps_ingest.read import load_windows, plan_windows
from smallcaps_ingest.simulator import SimConfig, Simulator
from smallcaps_ingest_tests.conftest import REPO, TEST_KEY, cli_env
from smallcaps_ingest_tests.resilience_helpers import (
    assert_windows_exact,
    cli_instance,
    kill_group,
    manifest_windows,
    materialize,
    materialize_argv,
    release_memory,
    requests_outside_todo,
    smallcaps_ingest,
    wait_first_request,
    write_events_subset,
)
from smallcaps_ingest_tests.s3_helpers import SECRET, list_keys, moto_s3, new_bucket

CHECK_NAMES = (
    "no_partial_events", "no_missing_events", "no_tmp_orphans", "timestamps_in_window", "rows_sorted",
    "sequence_unique", "quotes_bid_le_ask", "schema_as_documented",
)
SYMBOLS = ("AAOI", "BBIG", "BRK.B", "CLOV")  # 20 + 22 + 14 + 24 events
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})


@pytest.fixture(scope="module")
def s3_server() -> Iterator[dict[str, str]]:
    with moto_s3() as env:
        yield env


@pytest.fixture
def s3(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, str], str]]:
    """(the AWS variables, a new bucket); this process reaches the server too (storage.s3())."""
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    storage._s3.cache_clear()
    yield s3_server, new_bucket(s3_server)
    storage._s3.cache_clear()


def _env(tmp_path: Path, sim: Simulator, s3: tuple[dict[str, str], str], **extra: str) -> dict[str, str]:
    aws, bucket = s3
    return cli_env(
        tmp_path,
        SMALLCAPS_DATA_DIR=f"s3://{bucket}/tree",
        POLYGON_BASE_URL=sim.base_url,
        POLYGON_API_KEY=TEST_KEY,
        POLYGON_BUDGET_PATH=str(tmp_path / "budget.sqlite"),
        **aws,
        **extra,
    )


def _read(d: object, name: str) -> pl.DataFrame:
    return pl.read_parquet(storage.source(f"{d}/{name}"))


def _tree_keys(aws: dict[str, str], bucket: str) -> dict[str, int]:
    return {k.removeprefix("tree/"): v for k, v in list_keys(aws, bucket).items()}


def _events_in_bucket(keys: dict[str, int]) -> dict[tuple[str, str], set[str]]:
    """(symbol, event id) -> the data files its prefix holds, from the test's own listing."""
    out: dict[tuple[str, str], set[str]] = {}
    for k in keys:
        parts = k.split("/")
        if parts[0] == "event_windows" and len(parts) == 4:
            sym, eid = parts[1].removeprefix("symbol="), parts[2].removeprefix("event=")
            out.setdefault((sym, eid), set()).add(parts[3])
    return out


def _check_status(env: dict[str, str]) -> dict[tuple[str, str], str]:
    keys = [dg.AssetCheckKey(dg.AssetKey("event_windows"), n) for n in CHECK_NAMES]
    with cli_instance(env) as instance:
        infos = instance.event_log_storage.get_asset_check_partition_info(keys)  # type: ignore[attr-defined]
        return {(i.check_key.name, i.partition_key): i.latest_execution_status.value for i in infos}


def _json(env: dict[str, str], *args: str) -> dict:
    out = smallcaps_ingest(env, *args, "--json", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def test_s3_end_to_end_resume_checks_status_report(tmp_path: Path, s3: tuple[dict[str, str], str]) -> None:
    aws, bucket = s3
    release_memory()
    with Simulator(SimConfig()) as sim:
        env = _env(tmp_path, sim, s3, POLYGON_MAX_RPS="200")
        data = env["SMALLCAPS_DATA_DIR"]
        outs = [materialize(env, "--select", "manifest", "--config-json", IN_PROCESS)]
        manifest = pl.read_parquet(storage.source(f"{data}/manifest.parquet"))
        assert manifest.height == 300
        outs.append(materialize(env, "--select", "event_windows", "--partition-range", "AAOI...CLOV"))
        sub = manifest.filter(pl.col("symbol").is_in(SYMBOLS))
        assert assert_windows_exact(_read, data, sub) == 20 + 22 + 14 + 24 == sub.height

        keys = _tree_keys(aws, bucket)
        events = _events_in_bucket(keys)
        assert len(events) == sub.height and all(f == set(store.FILES) for f in events.values())
        assert not [k for k in keys if store.TMP_MARK in k]  # no temporary object, ever
        assert {"manifest.parquet", "_source.json", "_state/density.json"} <= set(keys)
        # a real-API client (pointed at the simulator)
        assert json.loads(storage.read_bytes(f"{data}/_source.json")) == {"source": "polygon"}
        assert not (tmp_path / "s3:").exists() and not (REPO / "s3:").exists()
        status = _check_status(env)
        for sym in SYMBOLS:
            for name in CHECK_NAMES:
                assert status[(name, sym)] == "SUCCEEDED", (name, sym)

        # resume: one object deleted -> exactly that event is requested again
        windows = manifest_windows(sub)
        victim = windows["AAOI"][5]
        storage.remove(f"{store.event_dir(data, 'AAOI', victim.event_id)}/trades.parquet")
        st = _json(env, "status", "--verify")  # the disk's view (the instance's is per materialization)
        assert (st["events"]["done"], st["events"]["partial"]) == (sub.height - 1, 1), st["events"]
        sim.reset_counters()
        outs.append(materialize(env, "--select", "event_windows", "--partition", "AAOI"))
        assert {(r.endpoint, r.gte_ns, r.lt_ns) for r in sim.request_log()} == {
            ("trades", victim.start_ns, victim.end_ns), ("quotes", victim.start_ns, victim.end_ns)}
        assert len(sim.request_log()) == 2
        assert assert_windows_exact(_read, data, sub.filter(pl.col("symbol") == "AAOI")) == 20

        # status, default and --verify: the same counts from the bucket
        st = _json(env, "status")
        assert (st["events"]["done"], st["events"]["partial"], st["events"]["total"]) == (80, 0, 300)
        ver = _json(env, "status", "--verify")
        assert (ver["events"]["done"], ver["events"]["partial"]) == (80, 0), ver["events"]

        # cleanup: nothing to remove on S3 (no tmp objects); reconcile: 4 symbols complete
        cl = _json(env, "cleanup", "--grace-minutes", "0")
        assert cl["removed"] == [] and not cl["refused"], cl
        rec = _json(env, "reconcile")
        assert rec["symbols"] == manifest["symbol"].n_unique(), rec

        # the report lands in the bucket
        outs.append(materialize(env, "--select", "ingestion_report", "--config-json", IN_PROCESS))
        keys = _tree_keys(aws, bucket)
        assert {"_reports/ingestion_report.parquet", "_reports/ingestion_report.png"} <= set(keys)
        report = pl.read_parquet(storage.source(f"{data}/_reports/ingestion_report.parquet"))
        assert report.filter(pl.col("symbol").is_in(SYMBOLS))["complete"].sum() == 80

        # load_windows on the S3 URL: exactly the rows of the per-event files
        got = load_windows(data, "trades", symbols=["CLOV"]).collect()
        want = sum(_read(store.event_dir(data, "CLOV", w.event_id), "trades.parquet").height
                   for w in windows["CLOV"])
        clov = report.filter(pl.col("symbol") == "CLOV")
        assert got.height == want == clov["trades_rows"].item() > 0
        assert got["event_id"].n_unique() == len(windows["CLOV"])

        # compacted on S3: load_windows reads the compacted objects, the same frame
        outs.append(materialize(env, "--select", "compacted_windows", "--partition", "CLOV"))
        plan = plan_windows(data, "trades", symbols=["CLOV"])
        assert plan.pieces and all(p.compacted for p in plan.pieces)
        for kind in ("trades", "quotes"):
            compacted = load_windows(data, kind, symbols=["CLOV"]).collect()
            assert compacted.equals(load_windows(data, kind, symbols=["CLOV"], use_compacted=False).collect())
        first = {k for k in _tree_keys(aws, bucket) if k.startswith("compacted/symbol=CLOV/")}
        outs.append(materialize(env, "--select", "compacted_windows", "--partition", "CLOV"))
        second = {k for k in _tree_keys(aws, bucket) if k.startswith("compacted/symbol=CLOV/")}
        assert len(second) == len(first) and second != first  # the old generation's objects removed

        # neither the API key nor the AWS secret is anywhere: logs, instance, bucket
        blobs = [o.stdout + o.stderr for o in outs]
        home = Path(env["DAGSTER_HOME"])
        blobs += [p.read_bytes().decode("latin-1") for p in home.rglob("*") if p.is_file()]
        blobs += [storage.read_bytes(f"s3://{bucket}/{k}").decode("latin-1") for k in list_keys(aws, bucket)]
        assert not any(TEST_KEY in b or SECRET in b for b in blobs)


def test_s3_kill_mid_run_leaves_no_partial_event_visible(
    tmp_path: Path, s3: tuple[dict[str, str], str]
) -> None:
    """SIGKILL the CLI's whole process group mid-fetch; list the bucket: no temporary object, no
    event with only its quotes (written last); events with only trades are partial, not complete,
    in status; the resumed run requests only what is incomplete and the tree ends exact."""
    aws, bucket = s3
    release_memory()
    events = tmp_path / "events.parquet"
    write_events_subset(events, ("AAOI", "BBIG", "BRK.B", "CLOV", "DGLY", "FCEL"))
    with Simulator(SimConfig(latency_ms=30, latency_jitter_ms=10, seed=7)) as sim:
        env = _env(tmp_path, sim, s3, POLYGON_MAX_RPS="30", SMALLCAPS_EVENTS=str(events))
        data = env["SMALLCAPS_DATA_DIR"]
        materialize(env, "--select", "manifest", "--config-json", IN_PROCESS)
        manifest = pl.read_parquet(storage.source(f"{data}/manifest.parquet"))
        windows = manifest_windows(manifest)
        log = tmp_path / "killed.log"
        t0 = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                materialize_argv("--select", "event_windows", "--partition-range", "AAOI...FCEL"),
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            assert wait_first_request(sim, t0, proc, timeout=90) is not None, log.read_text()[-3000:]
            time.sleep(2.0)
            assert proc.poll() is None, "the run finished before it could be killed"
        finally:
            kill_group(proc)
        assert proc.returncode == -signal.SIGKILL

        keys = _tree_keys(aws, bucket)
        assert not [k for k in keys if store.TMP_MARK in k]
        in_bucket = _events_in_bucket(keys)
        assert all(files in ({store.FILES[0]}, set(store.FILES)) for files in in_bucket.values()), in_bucket
        complete = {e for e, f in in_bucket.items() if f == set(store.FILES)}
        partial = {e for e, f in in_bucket.items() if f == {store.FILES[0]}}
        assert 0 < len(complete) < manifest.height, len(complete)
        st = _json(env, "status", "--verify")
        assert (st["events"]["done"], st["events"]["partial"]) == (len(complete), len(partial))
        plan = plan_windows(data, "quotes")  # what load_windows would read: the complete events only
        assert set(plan.events.select("symbol", "event_id").iter_rows()) == complete
        assert len(plan.missing) == manifest.height - len(complete)
        print(f"s3 kill: {len(complete)} complete, {len(partial)} partial of {manifest.height} events")

        # resume (the killed run is failed first, as after any crash): only incomplete events
        _json(env, "cleanup", "--grace-minutes", "0")
        before = {}
        for sym, eid in complete:
            before.setdefault(sym, set()).add(eid)
        t1 = time.monotonic()
        materialize(env, "--select", "event_windows", "--partition-range", "AAOI...FCEL")
        recs = [r for r in sim.request_log() if r.t >= t1]
        done = {s: frozenset(v) for s, v in before.items()}
        misplaced, useless = requests_outside_todo(recs, windows, done)
        assert recs and not misplaced and not useless, (misplaced[:3], useless[:3])
        in_bucket = _events_in_bucket(_tree_keys(aws, bucket))
        assert len(in_bucket) == manifest.height and all(f == set(store.FILES) for f in in_bucket.values())
        assert assert_windows_exact(_read, data, manifest) == manifest.height
