"""The fetch engine: plan -> fetch -> shape -> store, for many symbols on one worker pool.

A symbol's windows are planned into *jobs* (``plan.plan_groups``: windows no request range shares
with another job), each job's ranges are fetched on the shared fetch pool, and once all of a
job's ranges arrived it is shaped and written on a small pool of its own. The run is a
:class:`_Run`: a :class:`_Feed` hands out jobs symbol after symbol, and the run's counters
(ranges and bytes in flight, jobs left per symbol) sit under one condition variable.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import polars as pl

from smallcaps_ingest import storage
from smallcaps_ingest.core import shape, store
from smallcaps_ingest.core.cost import MergeRule
from smallcaps_ingest.core.feed import Feed as _Feed
from smallcaps_ingest.core.plan import (
    DensityStore,
    RequestRange,
    Window,
    overfetch_allowance,
    plan_groups,
)
from smallcaps_ingest.core.polygon.budget import StopRequested, stoppable
from smallcaps_ingest.core.polygon.client import PolygonAuthError, PolygonClient
from smallcaps_ingest.core.polygon.stats import FetchStats
from smallcaps_ingest.core.polygon.transport import abort_requests

# New jobs wait while fetched-but-unwritten rows exceed this (with at most 2x workers ranges).
FRAME_BYTES_HELD = 24 * 1024 * 1024
WRITERS = 2
# On S3 a write waits on two PUTs' round trips, not on the CPU: 2 writers left the tail of the
# writes trailing the fetch (benchmarks/README.md, D20).
WRITERS_S3 = 8


@dataclass
class SymbolOutcome:
    symbol: str
    events_total: int
    skipped: int  # already complete on disk before this run: no request made
    written: int = 0
    empty: int = 0  # written with zero trades and zero quotes
    files_bytes: int = 0  # parquet bytes written by this run
    stats: FetchStats = field(default_factory=FetchStats)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    begun: bool = False  # a request was planned (started is then when)
    error: BaseException | None = None

    @property
    def complete(self) -> int:
        return self.skipped + self.written

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def events_per_min(self) -> float:
        return self.written / (self.seconds / 60) if self.seconds > 0 and self.written else 0.0


@dataclass
class _Job:
    """Windows of one symbol that no planned range shares with any other job: fetched, shaped and
    written together (one day, or several days of a sparse name whose ranges cross days)."""

    symbol: str
    windows: list[Window]
    ranges: list[RequestRange] = field(default_factory=list)
    frames: dict[int, tuple[pl.DataFrame, int]] = field(default_factory=dict)  # kept rows, raw count
    remaining: int = 0  # ranges not yet fetched
    failed: bool = False  # a range failed: the job's later range results are dropped
    held: int = 0  # bytes of fetched frames this job holds until it is written
    done: threading.Event = field(default_factory=threading.Event)  # written or failed


_MALLOC_TUNED = False


def _glibc() -> ctypes.CDLL | None:
    """glibc, or None where there is none (macOS, Windows, musl: no mallopt knobs to set)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """Make glibc hand freed memory back instead of keeping it per thread; False (and nothing
    changed) where glibc is absent.

    Page bodies and frames are megabytes each and short-lived, allocated on a dozen threads: by
    default glibc gives busy threads their own arenas and raises its mmap threshold after such
    frees, so they are recycled inside ever-growing heaps. Two arenas, a fixed mmap threshold and
    a trim threshold cut a run's peak RSS at no measured throughput cost. The thresholds are
    1 MiB so that zstd's compression contexts (one per Parquet column) fall under them and are
    recycled instead of mapped and unmapped each time (benchmarks/cost_per_tick.py).
    Process-wide, so done once, by the engine.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    _MALLOC_TUNED = all(
        libc.mallopt(param, value) == 1
        for param, value in ((m_arena_max, 2), (m_mmap_threshold, 1 << 20), (m_trim_threshold, 1 << 20))
    )
    return _MALLOC_TUNED


class _Run:
    """One :meth:`FetchEngine.run`: its symbols' outcomes and the scheduling state.

    Bounds: at most ``2 * workers`` ranges in flight (a job waiting for its write counts as one),
    and no new job while the fetched-but-unwritten frames exceed ``FRAME_BYTES_HELD``. A symbol
    is finished when all its jobs were handed out and each was written or failed."""

    def __init__(self, engine: FetchEngine, work: Mapping[str, Sequence[Window]],
                 on_symbol_done: Callable[[SymbolOutcome], None] | None):
        self.engine = engine
        self.on_symbol_done = on_symbol_done
        self.outcomes: dict[str, SymbolOutcome] = {}
        todos: dict[str, list[Window]] = {}
        complete = store.complete_events(engine.data_dir, work)
        for symbol, windows in work.items():
            done = complete[symbol]
            todo = todos[symbol] = [w for w in windows if w.event_id not in done]
            self.outcomes[symbol] = SymbolOutcome(symbol, len(windows), skipped=len(windows) - len(todo))
        pending = [s for s in work if todos[s]]
        self.feed = _Feed(lambda s: engine._jobs(s, todos[s], self.outcomes[s]), pending)
        self.cond = threading.Condition()
        self.jobs_left: dict[str, int] = dict.fromkeys(work, 0)  # handed out, not yet written or failed
        self.feeding: set[str] = set(pending)  # symbols with jobs still to hand out
        self.finished: list[str] = [s for s in work if s not in self.feeding]  # to report
        self.in_flight = 0
        self.held_bytes = 0  # fetched rows waiting for their job to be written
        self.fatal: list[BaseException] = []  # errors that end the run (auth, source mismatch)
        self.exhausted = False  # nothing more is handed out
        self.results: list[SymbolOutcome] = []
        # Shaping and writing run on their own small pool, so the fetch workers keep the request
        # budget busy (writes on the fetch workers capped the request rate: benchmarks).
        writers = WRITERS_S3 if storage.is_remote(engine.data_dir) else WRITERS
        self.writer = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="writer")

    def execute(self) -> list[SymbolOutcome]:
        fetchers = ThreadPoolExecutor(max_workers=self.engine.workers, thread_name_prefix="polygon")
        with self.writer, fetchers as pool:
            while True:
                if self.engine.stopping and not self.exhausted:
                    self.exhausted = True  # queued ranges are cancelled
                    pool.shutdown(wait=False, cancel_futures=True)
                with self.cond:
                    self._report_finished()
                    if self._over():
                        break
                    if self._blocked():
                        self.cond.wait(timeout=0.5)
                        continue
                self._hand_out(pool)
        self._cut_short()
        return self.results

    def _report_finished(self) -> None:  # under self.cond, released around the callback
        while self.finished:
            self.results.append(self.outcomes[self.finished.pop(0)])
            if self.on_symbol_done:
                self.cond.release()
                try:
                    self.on_symbol_done(self.results[-1])
                finally:
                    self.cond.acquire()

    def _over(self) -> bool:
        """Nothing more will be handed out and every job handed out was written or failed."""
        return bool(self.exhausted or self.fatal) and self.in_flight == 0 and all(
            n <= 0 or self.outcomes[s].error or self.fatal for s, n in self.jobs_left.items()
        )

    def _blocked(self) -> bool:
        """No job may be handed out now: stopping, failed, or a bound on what is in flight reached."""
        return bool(
            self.exhausted
            or self.fatal
            or self.in_flight >= 2 * self.engine.workers
            or self.held_bytes > FRAME_BYTES_HELD
        )

    def _hand_out(self, pool: ThreadPoolExecutor) -> None:
        """Hand the next job's ranges to the pool (or note a symbol fully handed out, or wait)."""
        item = self.feed.next()
        if item is _Feed.END:
            self.exhausted = True
        elif item is None:  # every symbol left waits for its probe
            with self.cond:
                self.cond.wait(timeout=0.05)
        elif isinstance(item, str):  # the symbol's last job was handed out
            with self.cond:
                self.feeding.discard(item)
                if self.jobs_left[item] == 0:
                    self._finish_symbol(item)
        else:
            self._submit(pool, item)  # type: ignore[arg-type]

    def _submit(self, pool: ThreadPoolExecutor, job: _Job) -> None:
        outcome = self.outcomes[job.symbol]
        with self.cond:
            self.jobs_left[job.symbol] += 1
        if not outcome.begun:  # the symbol's clock starts with its first request, not the run's
            outcome.begun = True
            outcome.started = time.monotonic()
        job.remaining = len(job.ranges)
        for idx, rng in enumerate(job.ranges):
            with self.cond:
                self.in_flight += 1
            fut = pool.submit(self.engine._fetch_range, job.symbol, rng, outcome.stats)
            fut.add_done_callback(lambda f, j=job, i=idx: self._range_done(j, i, f))

    def _range_done(self, job: _Job, idx: int, fut: Future[tuple[pl.DataFrame, int]]) -> None:
        """A range arrived (or failed, or was cancelled): the job is written once all arrived."""
        error = self.engine._stopped_error(job.symbol) if fut.cancelled() else fut.exception()
        with self.cond:
            self.in_flight -= 1
            job.remaining -= 1
            first_failure = error is not None and not job.failed
            if error is None and not job.failed:
                job.frames[idx] = fut.result()
                size = job.frames[idx][0].estimated_size()
                job.held += size
                self.held_bytes += size
            elif first_failure:
                job.failed = True
                job.frames.clear()
                self.held_bytes -= job.held
                job.held = 0
            ready = job.remaining == 0 and not job.failed
            if ready:
                self.in_flight += 1  # a pending write holds its frames: count it against the bound
            self.cond.notify_all()
        if first_failure:
            self._job_done(job, error)
        elif ready:
            self.writer.submit(self._write, job)

    def _write(self, job: _Job) -> None:
        try:
            self._job_done(job, None)
        finally:
            with self.cond:
                self.in_flight -= 1
                self.held_bytes -= job.held
                self.cond.notify_all()

    def _job_done(self, job: _Job, error: BaseException | None) -> None:
        """Write a fetched job (error None) or record its failure on its symbol."""
        outcome = self.outcomes[job.symbol]
        if error is None:
            try:
                self.engine._write_job(job, outcome)
            except BaseException as e:  # noqa: BLE001 - recorded on the symbol, run fails later
                outcome.stats.count("errors", "write" if isinstance(e, OSError) else type(e).__name__)
                error = e
        job.done.set()
        with self.cond:
            if error is not None and outcome.error is None:
                outcome.error = error
                if isinstance(error, (PolygonAuthError, store.SourceMismatchError)):
                    self.fatal.append(error)
            self.jobs_left[job.symbol] -= 1
            if self.jobs_left[job.symbol] == 0 and job.symbol not in self.feeding:
                self._finish_symbol(job.symbol)
            self.cond.notify_all()

    def _finish_symbol(self, symbol: str) -> None:  # under self.cond
        self.outcomes[symbol].finished = time.monotonic()
        self.finished.append(symbol)

    def _cut_short(self) -> None:
        """Symbols a fatal error or a stop cut short end with that error, and are reported."""
        for outcome in self.outcomes.values():
            if outcome not in self.results:
                if outcome.error is None:
                    stopped = self.engine._stopped_error(outcome.symbol)
                    outcome.error = self.fatal[0] if self.fatal else stopped
                outcome.finished = outcome.finished or time.monotonic()
                self.results.append(outcome)
                if self.on_symbol_done:
                    self.on_symbol_done(outcome)


class FetchEngine:
    """Fetch and write many symbols' events on one shared thread pool.

    Work is fed job by job (a group of windows no range shares with another group: see
    ``plan.components``), at most ``2 * workers`` ranges in flight, so memory stays bounded and
    the pool moves on to the next symbol instead of idling at the tail of a small one. A symbol is
    planned ``plan.PLAN_HORIZON`` windows at a time, when its next job is due, so later jobs are
    planned on the densities its earlier ones observed. ``on_symbol_done`` runs on the calling
    thread as each symbol finishes.

    ``overfetch_rows`` (None: :func:`plan.overfetch_allowance` of the budget's rate) lets a range
    fetch that many rows beyond what its windows need, which is what merges a sparse name's
    events across days. ``time_cost``: no merged range holds more rows than the workers transfer
    and decode in the budget's time for them (``cost.TransferModel``, learned from the client's
    responses); False plans the fewest pages within the over-fetch bound alone.

    :meth:`stop` (from any thread) ends a run promptly: no further request, page or retry is
    sent, queued ranges are cancelled, jobs whose ranges were all fetched are still written (each
    event's two files atomically, or not at all), and every symbol not finished by then ends
    with a :class:`StopRequested` error. A stopped engine stays stopped.
    """

    def __init__(
        self,
        client: PolygonClient,
        data_dir: str,
        *,
        workers: int = 12,
        hz: float = 1.0,
        max_overfetch: float = 4.0,
        overfetch_rows: int | None = None,
        density: DensityStore | None = None,
        time_cost: bool = True,
    ):
        self.client = client
        self.data_dir = data_dir
        self.workers = max(1, workers)
        self.hz = hz
        self.max_overfetch = max_overfetch
        self.overfetch_rows = (
            overfetch_allowance(client.budget.max_rps) if overfetch_rows is None else max(0, overfetch_rows)
        )
        self.density = density or DensityStore(None)
        self.time_cost = time_cost
        tune_malloc()
        self._source_checked = False
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Stop the run (see the class docstring); returns at once, ``run`` returns soon after.

        Requests in flight are cut (their sockets shut): a range's data is written only once all
        its pages arrived, so waiting for one more page buys nothing but delay."""
        self._stop.set()
        abort_requests(self._stop)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(
        self,
        work: Mapping[str, Sequence[Window]],
        on_symbol_done: Callable[[SymbolOutcome], None] | None = None,
    ) -> list[SymbolOutcome]:
        """Fetch and write every window of ``work`` not complete on disk; one outcome per symbol."""
        results = _Run(self, work, on_symbol_done).execute()
        self.density.save()
        return results

    def _fetch_range(self, symbol: str, rng: RequestRange, stats: FetchStats) -> tuple[pl.DataFrame, int]:
        """One range, every page of it; each page and retry first checks the stop signal."""
        with stoppable(self._stop):
            return self.client.fetch_windows(
                rng.kind,
                symbol,
                rng.start_ns,
                rng.end_ns,
                stats,
                self.hz > 0,
                [(w.start_ns, w.end_ns) for w in rng.events],
            )

    def _merge_rule(self, kind: str) -> MergeRule:
        """How ranges may merge at this engine's workers and budget, as the client's responses so
        far taught (``cost.TransferModel.rule``)."""
        return self.client.timing.rule(kind, self.workers, self.client.budget.max_rps)

    @staticmethod
    def _stopped_error(symbol: str) -> StopRequested:
        return StopRequested(
            f"{symbol}: stopped before it finished (SIGTERM or run termination); its complete events "
            "are on disk and a resume skips them"
        )

    def _check_source(self) -> None:
        with self._lock:
            if not self._source_checked:
                store.check_source(self.data_dir, self.client.source)
                self._source_checked = True

    def _jobs(
        self, symbol: str, todo: Sequence[Window], outcome: SymbolOutcome
    ) -> Iterator[_Job | threading.Event]:
        """The symbol's jobs in time order (``plan.plan_groups``); after a probe, its ``done``
        event, so the rest is planned on what the probe taught. Stops once the symbol has failed."""
        for windows, rngs, probe in plan_groups(
            symbol, todo, self.density, self.max_overfetch, overfetch_rows=self.overfetch_rows,
            merge_rule=self._merge_rule if self.time_cost else None,
        ):
            if outcome.error is not None:
                return
            job = _Job(symbol, windows, rngs)
            yield job
            if probe:
                yield job.done

    def _write_job(self, job: _Job, outcome: SymbolOutcome) -> None:
        """Split each range back out per event, shape, and write the event's two files."""
        by_event: dict[str, dict[str, pl.DataFrame]] = {}
        for idx, rng in enumerate(job.ranges):
            frame, raw = job.frames[idx]
            self.density.observe(job.symbol, rng.kind, rng.start_ns, rng.end_ns, raw)
            for w in rng.events:
                by_event.setdefault(w.event_id, {})[rng.kind] = frame
        job.frames.clear()
        self._check_source()
        for w in job.windows:
            raw = by_event[w.event_id]
            trades = shape.shape_trades(raw["trades"], w.start_ns, w.end_ns)
            quotes = shape.shape_quotes(raw["quotes"], w.start_ns, w.end_ns, self.hz)
            size = store.write_event(self.data_dir, job.symbol, w.event_id, trades, quotes)
            outcome.stats.add(rows_kept=trades.height + quotes.height)
            with self._lock:
                outcome.written += 1
                outcome.empty += int(trades.height == 0 and quotes.height == 0)
                outcome.files_bytes += size


def windows_from_frame(events: pl.DataFrame) -> list[Window]:
    """Manifest rows (event_id, ts_start, ts_end) -> windows in integer nanoseconds."""
    df = events.select(
        "event_id",
        pl.col("ts_start").dt.cast_time_unit("ns").dt.epoch("ns").alias("s"),
        pl.col("ts_end").dt.cast_time_unit("ns").dt.epoch("ns").alias("e"),
    )
    return [Window(e, s, t) for e, s, t in df.iter_rows()]


def merge_stats(outcomes: Iterable[SymbolOutcome]) -> FetchStats:
    total = FetchStats()
    for o in outcomes:
        total.merge(o.stats)
    return total
