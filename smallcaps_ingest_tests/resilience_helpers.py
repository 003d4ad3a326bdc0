"""Helpers for test_resilience: the real CLI as bounded subprocesses, the tree against ground truth,
process groups, and the Dagster instance of a CLI run (opened read-mostly from the test process)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from smallcaps_ingest.core import shape, store
from smallcaps_ingest.core.engine import windows_from_frame
from smallcaps_ingest.core.plan import Window
from smallcaps_ingest.simulator import RequestRecord, Simulator, clear_cache, ground_truth
from smallcaps_ingest_tests.conftest import BIN, REPO

CLI_TIMEOUT = 150  # seconds: no single CLI call of this file may take longer


# ----------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------
def dagster(
    env: Mapping[str, str],
    *args: str,
    ok: bool = True,
    timeout: float = CLI_TIMEOUT,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``dagster ARGS`` in its own process group; on timeout the whole group (step workers too) is killed."""
    argv = [str(BIN / "dagster"), *args]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"dagster {' '.join(args)} still running after {timeout}s:\n{err[-3000:]}"
        ) from None
    finally:
        if proc.poll() is None:
            kill_group(proc)
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if ok and done.returncode != 0:
        raise AssertionError(f"dagster {' '.join(args)} failed:\n{out[-4000:]}\n{err[-4000:]}")
    return done


def materialize(
    env: Mapping[str, str],
    *args: str,
    ok: bool = True,
    timeout: float = CLI_TIMEOUT,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    return dagster(
        env,
        "asset",
        "materialize",
        "-m",
        "smallcaps_ingest",
        *args,
        ok=ok,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def materialize_argv(*args: str) -> list[str]:
    return [str(BIN / "dagster"), "asset", "materialize", "-m", "smallcaps_ingest", *args]


def smallcaps_ingest(
    env: Mapping[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "smallcaps-ingest"), *args],
        cwd=REPO,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ----------------------------------------------------------------------------------------------
# Process groups
# ----------------------------------------------------------------------------------------------
def group_pids(pgid: int, *, include_zombies: bool = False) -> set[int]:
    """Processes whose process group is ``pgid`` (from /proc; zombies left out unless asked)."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and (include_zombies or state not in ("Z", "X")):
            found.add(int(entry))
    return found


def kill_group(proc: subprocess.Popen, timeout: float = 30) -> set[int]:  # type: ignore[type-arg]
    """SIGKILL the whole process group of ``proc`` (started with start_new_session=True).

    Returns the pids that were in the group just before the kill, once none of them runs any more.
    """
    pids = group_pids(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while group_pids(proc.pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of group {proc.pid} survived SIGKILL: {group_pids(proc.pid)}")
        time.sleep(0.05)
    return pids | {proc.pid}


def wait_first_request(
    sim: Simulator, since: float, proc: subprocess.Popen[bytes], timeout: float, on_poll=None
) -> RequestRecord | None:  # type: ignore[no-untyped-def]
    """The first request the simulator saw at or after monotonic time ``since`` (None if proc ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = [r for r in sim.request_log() if r.t >= since]
        if recs:
            return recs[0]
        if proc.poll() is not None:
            return None
        if on_poll is not None:
            on_poll()
        time.sleep(0.05)
    raise AssertionError(f"no request within {timeout}s of the run's start")


# ----------------------------------------------------------------------------------------------
# Events and the tree
# ----------------------------------------------------------------------------------------------
def requests_outside_todo(
    recs: list[RequestRecord], windows: dict[str, list], complete: dict[str, frozenset[str]]
) -> tuple[list[RequestRecord], list[RequestRecord]]:
    """(requests whose range is not built from incomplete events' windows, requests serving no incomplete
    event). The engine plans a range as the union of the windows of the events still to fetch (windows
    that overlap or touch always merge; separated windows of a day may merge to save pages), so every
    request's [gte, lt) starts at the start of an incomplete event's window and ends at the end of one;
    next_url pages carry the same bounds. A request that served only complete events would start or end
    at a complete event's boundary, or overlap no incomplete window."""
    misplaced, useless = [], []
    for r in recs:
        assert r.ticker in windows, r
        todo = [w for w in windows[r.ticker] if w.event_id not in complete.get(r.ticker, frozenset())]
        if r.gte_ns not in {w.start_ns for w in todo} or r.lt_ns not in {w.end_ns for w in todo}:
            misplaced.append(r)
        if not any(w.start_ns < r.lt_ns and r.gte_ns < w.end_ns for w in todo):
            useless.append(r)
    return misplaced, useless


def write_events_subset(path: Path, symbols: Iterable[str] | None = None) -> pl.DataFrame:
    from smallcaps_ingest.core.events import read_events
    from smallcaps_ingest.simulator.sample import SAMPLE_EVENTS_PATH

    events = read_events(SAMPLE_EVENTS_PATH)
    if symbols is not None:
        events = events.filter(pl.col("symbol").is_in(list(symbols)))
    events.write_parquet(path)
    return events


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def release_memory(above_mb: float = 0.0) -> None:
    """Drop the simulator's minute cache and give the freed heap back to the OS (when RSS > above_mb).

    Serving and ground_truth() generate minutes into the process-wide cache and build many short-lived
    dicts; before cbc2621 (compact cached rows) this test process reached 5 GB. Clearing between
    symbols and runs keeps the peak well under 1 GB on a shared 2-core box.
    """
    if above_mb and rss_mb() < above_mb:
        return
    clear_cache()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def truth_frame(kind: str, ticker: str, lo: int, hi: int) -> pl.DataFrame:
    schema = shape.RAW_SCHEMAS[kind]
    rows = ground_truth(kind, ticker, lo, hi)
    return pl.from_dicts(rows, schema=schema) if rows else pl.DataFrame(schema=schema)


def manifest_windows(manifest: pl.DataFrame) -> dict[str, list[Window]]:
    return {
        sym: windows_from_frame(manifest.filter(pl.col("symbol") == sym))
        for sym in manifest["symbol"].unique().sort()
    }


def expected_files(data: Path, manifest: pl.DataFrame) -> set[Path]:
    out: set[Path] = set()
    for sym, ws in manifest_windows(manifest).items():
        for w in ws:
            d = store.event_dir(data, sym, w.event_id)
            out |= {d / f for f in store.FILES}
    return out


def data_files(data: Path) -> set[Path]:
    """Every regular file under event_windows/ (tmp files included)."""
    root = store.windows_root(data)
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def tmp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(f"*{store.TMP_MARK}*") if p.is_file())


def assert_dataset_exact(data: Path, manifest: pl.DataFrame, hz: float = 1.0) -> int:
    """The tree holds exactly the manifest's events (no extra or missing file, no tmp file), and every
    file equals the simulator's ground truth shaped the documented way. Returns the event count."""
    want = expected_files(data, manifest)
    got = data_files(data)
    assert not (got - want), f"unexpected files: {sorted(map(str, got - want))[:10]}"
    assert not (want - got), f"missing files: {sorted(map(str, want - got))[:10]}"
    return assert_windows_exact(lambda d, f: pl.read_parquet(d / f), data, manifest, hz)


def assert_windows_exact(
    read: Callable[[Path, str], pl.DataFrame], data: object, manifest: pl.DataFrame, hz: float = 1.0
) -> int:
    """Every manifest event's two files (``read(event_dir, file name)``) equal the simulator's ground
    truth shaped the documented way. Returns the event count."""
    n = 0
    for sym, ws in manifest_windows(manifest).items():
        release_memory(above_mb=1000)  # minutes are never shared between symbols: bound the peak
        for w in ws:
            d = store.event_dir(data, sym, w.event_id)  # type: ignore[arg-type]
            got_t, got_q = read(d, store.FILES[0]), read(d, store.FILES[1])
            want_t = shape.shape_trades(
                truth_frame("trades", sym, w.start_ns, w.end_ns), w.start_ns, w.end_ns
            )
            want_q = shape.shape_quotes(
                truth_frame("quotes", sym, w.start_ns, w.end_ns), w.start_ns, w.end_ns, hz
            )
            assert got_t["sequence_number"].n_unique() == got_t.height, ("duplicate trades", sym, w.event_id)
            assert got_t.equals(want_t), ("trades differ from ground truth", sym, w.event_id)
            assert got_q.equals(want_q), ("quotes differ from ground truth", sym, w.event_id)
            n += 1
    return n


def complete_events(data: Path) -> dict[str, frozenset[str]]:
    """symbol -> event ids with both files on disk (what the engine will skip)."""
    return {sym: store.scan_symbol(data, sym).complete for sym in store.iter_symbols(data)}


@dataclass(frozen=True)
class FileStamp:
    ino: int
    size: int
    mtime_ns: int


def stamps(data: Path, complete: Mapping[str, Iterable[str]]) -> dict[Path, FileStamp]:
    out: dict[Path, FileStamp] = {}
    for sym, ids in complete.items():
        for eid in ids:
            for f in store.FILES:
                p = store.event_dir(data, sym, eid) / f
                st = p.stat()
                out[p] = FileStamp(st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def tree_snapshot(root: Path, exclude: Iterable[Path] = ()) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file and directory under root, minus ``exclude``."""
    skip = [Path(e).resolve() for e in exclude]
    out: dict[str, tuple[int, int]] = {}
    for p in root.rglob("*"):
        rp = p.resolve()
        if any(rp == s or s in rp.parents for s in skip):
            continue
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


# ----------------------------------------------------------------------------------------------
# The instance of a CLI run
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cli_instance(env: Mapping[str, str]) -> Iterator[object]:
    """The CLI's Dagster instance, opened the way the CLI opens it (dagster.yaml reads DAGSTER_HOME)."""
    import dagster as dg

    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
        try:
            yield instance
        finally:
            instance.dispose()
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old


def all_run_ids(env: Mapping[str, str]) -> set[str]:
    with cli_instance(env) as instance:
        return {r.run_id for r in instance.get_runs()}  # type: ignore[attr-defined]


def run_statuses(env: Mapping[str, str]) -> dict[str, str]:
    with cli_instance(env) as instance:
        return {r.run_id: r.status.value for r in instance.get_runs()}  # type: ignore[attr-defined]


def pool_claims(env: Mapping[str, str], pool: str = "polygon_api") -> tuple[int, list[str]]:
    """(slot limit, run ids holding a claimed slot) of a concurrency pool."""
    with cli_instance(env) as instance:
        info = instance.event_log_storage.get_concurrency_info(pool)  # type: ignore[attr-defined]
        return info.slot_count, [s.run_id for s in info.claimed_slots]


def fail_dead_runs(env: Mapping[str, str], dead: Iterable[str]) -> list[str]:
    """The manual recovery a killed CLI run needs today: mark it failed and free its pool slots."""
    done = []
    with cli_instance(env) as instance:
        for run_id in dead:
            run = instance.get_run_by_id(run_id)  # type: ignore[attr-defined]
            if run is not None and not run.is_finished:
                instance.report_run_failed(run, "process killed (SIGKILL) by test_resilience")  # type: ignore[attr-defined]
                done.append(run_id)
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)  # type: ignore[attr-defined]
    return done


def latest_materializations(env: Mapping[str, str], symbols: Iterable[str]) -> dict[str, tuple[str, dict]]:
    """symbol -> (run_id, metadata as plain values) of the latest event_windows materialization."""
    import dagster as dg

    out: dict[str, tuple[str, dict]] = {}
    with cli_instance(env) as instance:
        for sym in symbols:
            recs = instance.fetch_materializations(  # type: ignore[attr-defined]
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("event_windows"), asset_partitions=[sym]), limit=1
            ).records
            if recs:
                meta = {k: v.value for k, v in recs[0].asset_materialization.metadata.items()}
                out[sym] = (recs[0].run_id, meta)
    return out
