"""CPU cost per tick of the fetch path (parse, shape, write), JSON decoders, and peak RSS of a run.

1. End to end, on page bodies fetched once from the simulator (dense symbol HVY, [-3, +7] min
   windows in RTH, ``limit=50000`` pages): CPU ms per 1,000 raw ticks, by stage, measured with
   ``time.process_time()`` (all threads of this process, so polars' own threads count):
     parse = ``pages.parse_page`` on every page; then concat per range (as ``fetch_windows``);
     shape = ``shape.shape_trades`` + ``shape.shape_quotes`` (1 Hz) per event;
     write = ``store.write_event`` (two zstd parquet files, fsync, atomic rename) per event,
     and separately the encoding alone (``store.encode_parquet``).
   The process first tunes glibc's allocator as ``FetchEngine`` does (``engine.tune_malloc``).
   Each stage runs ``--repeat`` times; the lowest CPU is kept. The same is then done for typical
   small-cap pages (``--mixed-events`` of the clustered manifest, one range per event and
   endpoint), where per-page and per-file fixed costs weigh more.
2. Decoders on one 50,000-row quotes page, each followed by building the typed polars frame:
   stdlib ``json``, ``orjson``, ``msgspec`` untyped, ``msgspec`` typed structs and ``polars.read_json``
   (``pages.parse_page``, what the engine uses), with how well each scales on two threads (the
   GIL: a decoder that holds it caps a run at one core).
3. Peak RSS (``ru_maxrss``) of a child process that runs a 12-worker ``FetchEngine`` over a few
   hundred events of mixed liquidity (in_play + isolated manifests; the simulator runs in another
   process, warmed, no latency, budget 1,000 req/s).

    python benchmarks/cost_per_tick.py            # ~1 min
    python benchmarks/cost_per_tick.py --skip rss,decoders --dir /data/bench   # write where the data goes
    python benchmarks/cost_per_tick.py --events 3 --repeat 2 --rss-events 100
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import _bootstrap  # noqa: F401
import msgspec
import orjson
import polars as pl
import pyarrow as pa
import requests
from _common import API_KEY, SimHost, load_average, run_ours, table
from manifests import Event, _instant, describe, make, trading_days

from smallcaps_ingest.core import shape, store
from smallcaps_ingest.core.engine import tune_malloc
from smallcaps_ingest.core.polygon import pages
from smallcaps_ingest.core.polygon.pages import parse_page

SYMBOL = "HVY"
NS = 1_000_000_000
TARGET_MS = 1.0
TARGET_RSS_MB = 300


def dense_events(n: int) -> list[Event]:
    """``n`` HVY events on distinct trading days, at RTH times spread over the day."""
    days = trading_days()
    times = (10 * 60 + 5, 11 * 60 + 20, 12 * 60 + 40, 13 * 60 + 50, 14 * 60 + 30, 9 * 60 + 45)
    out = []
    for i in range(n):
        t = _instant(days[20 + 17 * i], times[i % len(times)])
        out.append(Event(SYMBOL, f"{SYMBOL}_{i}", t - 3 * 60 * NS, t + 7 * 60 * NS))
    return out


def fetch_bodies(base_url: str, events: list[Event]) -> list[tuple[Event, str, list[bytes]]]:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {API_KEY}"
    out = []
    for e in events:
        for kind in ("trades", "quotes"):
            bodies = []
            r = s.get(f"{base_url}/v3/{kind}/{e.symbol}", params={
                "timestamp.gte": e.start_ns, "timestamp.lt": e.end_ns, "order": "asc", "sort": "timestamp",
                "limit": 50_000}, timeout=60)
            while True:
                r.raise_for_status()
                bodies.append(r.content)
                nxt = orjson.loads(r.content).get("next_url")
                if not nxt:
                    break
                r = s.get(nxt, timeout=60)
            out.append((e, kind, bodies))
    return out


def cpu_of(fn: Callable[[], object], repeat: int) -> tuple[float, float, object]:
    """(lowest process CPU seconds, its wall seconds, last result) over ``repeat`` runs."""
    best = (float("inf"), 0.0)
    result: object = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        c, w = time.process_time() - c0, time.perf_counter() - w0
        if c < best[0]:
            best = (c, w)
    return best[0], best[1], result


def end_to_end(fetched: list[tuple[Event, str, list[bytes]]], repeat: int,
               label: str, base: str | None) -> tuple[list[tuple[object, ...]], float, str]:
    """Stage rows for one data set; returns (rows, CPU ms per 1k ticks end to end, description)."""
    events = {e.event_id: e for e, _, _ in fetched}

    def parse() -> dict[tuple[str, str], list[pl.DataFrame]]:
        # as the engine does at 1 Hz: quotes decoded as NBBO fields only
        return {(e.event_id, kind): [parse_page(kind, b, kind == "quotes")[0] for b in bodies]
                for e, kind, bodies in fetched}

    c_parse, w_parse, pages = cpu_of(parse, repeat)
    assert isinstance(pages, dict)

    def assemble() -> dict[tuple[str, str], pl.DataFrame]:  # as fetch_windows: concat, no sort
        return {key: pl.concat(frames) if len(frames) > 1 else frames[0] for key, frames in pages.items()}

    c_asm, w_asm, raw = cpu_of(assemble, repeat)
    assert isinstance(raw, dict)
    ticks = {"trades": 0, "quotes": 0}
    for (_, kind), df in raw.items():
        ticks[kind] += df.height

    def shape_all() -> dict[str, tuple[pl.DataFrame, pl.DataFrame]]:
        return {eid: (shape.shape_trades(raw[(eid, "trades")], e.start_ns, e.end_ns),
                      shape.shape_quotes(raw[(eid, "quotes")], e.start_ns, e.end_ns, 1.0))
                for eid, e in events.items()}

    c_shape, w_shape, shaped = cpu_of(shape_all, repeat)
    assert isinstance(shaped, dict)

    with tempfile.TemporaryDirectory(prefix="bench-cpt-", dir=base) as tmp:
        counter = iter(range(10**9))

        def write_all() -> int:
            d = Path(tmp) / str(next(counter))
            return sum(store.write_event(d, e.symbol, eid, *shaped[eid]) for eid, e in events.items())

        # fsync's kernel time on this VM's disk swings 2-5x between minutes: more repeats, lowest kept
        c_write, w_write, _ = cpu_of(write_all, repeat + 2)
    frames = [f for pair in shaped.values() for f in pair]
    c_enc, w_enc, _ = cpu_of(lambda: [store.encode_parquet(f) for f in frames], repeat)

    k = sum(ticks.values()) / 1000
    total = c_parse + c_asm + c_shape + c_write
    wall = w_parse + w_asm + w_shape + w_write
    rows = [
        (label, "parse_page (polars JSON in pieces; NBBO fields of quotes)", c_parse * 1000,
         w_parse * 1000, c_parse * 1000 / k),
        ("", "concat pages per range", c_asm * 1000, w_asm * 1000, c_asm * 1000 / k),
        ("", "shape (trades raw, quotes 1 Hz)", c_shape * 1000, w_shape * 1000, c_shape * 1000 / k),
        ("", "write (2 zstd parquet, fsync, rename)", c_write * 1000, w_write * 1000, c_write * 1000 / k),
        ("", "  of which encoding (pyarrow, zstd)", c_enc * 1000, w_enc * 1000, c_enc * 1000 / k),
        ("", "  of which files (write, fsync, rename)", (c_write - c_enc) * 1000, (w_write - w_enc) * 1000,
         (c_write - c_enc) * 1000 / k),
        ("", "end to end", total * 1000, wall * 1000, total * 1000 / k),
    ]
    n_pages = sum(len(b) for _, _, b in fetched)
    desc = (f"{label}: {len(events)} events, {sum(ticks.values()):,} raw ticks (trades {ticks['trades']:,}, "
            f"quotes {ticks['quotes']:,}) in {n_pages} pages")
    user = (total - c_write + c_enc) * 1000 / k
    desc += f"; without the kernel's file work (write, fsync, rename): {user:.2f} ms per 1k ticks"
    return rows, total * 1000 / k, desc


def create_probe(base: str | None, events: int = 150, size: int = 12_000) -> float:
    """CPU ms per event to create what an event's write creates, without fsync or encoding.

    One directory and two files (temporary name, one write, rename). This is the kernel's cost of
    creating inodes in ``base``, which is the host's, not ours: on one VM's ext4 it measured
    0.1 ms in a fresh directory and 1.7 ms in one whose block group had seen create/delete churn
    (a shared ``/tmp``), and it moves the "files" row above by the same amount."""
    data = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="bench-probe-", dir=base) as tmp:
        c0 = time.process_time()
        for i in range(events):
            d = Path(tmp) / str(i)
            d.mkdir()
            for name in ("trades.parquet", "quotes.parquet"):
                fd = os.open(d / f"{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.replace(d / f"{name}.tmp", d / name)
        return (time.process_time() - c0) * 1000 / events


class _Quote(msgspec.Struct, gc=False):
    """The typed msgspec decoder the engine used until session 3 (kept here to compare)."""

    sip_timestamp: int = 0
    participant_timestamp: int | None = None
    bid_price: float | None = None
    ask_price: float | None = None
    bid_size: float | None = None
    ask_size: float | None = None
    bid_exchange: int | None = None
    ask_exchange: int | None = None
    sequence_number: int = 0
    tape: int | None = None
    conditions: list[int] | None = None
    indicators: list[int] | None = None


class _QuotesPage(msgspec.Struct, gc=False):
    results: list[_Quote] = []
    next_url: str | None = None


_ARROW = {pl.Int64(): pa.int64(), pl.Int32(): pa.int32(), pl.Float64(): pa.float64(),
          pl.List(pl.Int32()): pa.list_(pa.int32())}


def two_thread_speedup(fn: Callable[[], object], seconds: float = 1.5) -> float:
    """Calls per second on two threads / on one: ~2 when ``fn`` releases the GIL, ~1 when it holds it."""
    rates = []
    for threads in (1, 2):
        calls = [0] * threads
        stop = time.perf_counter() + seconds

        def loop(i: int, calls: list[int] = calls, stop: float = stop) -> None:
            while time.perf_counter() < stop:
                fn()
                calls[i] += 1

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        w0 = time.perf_counter()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        rates.append(sum(calls) / (time.perf_counter() - w0))
    return rates[1] / rates[0]


DecoderCase = tuple[str, Callable[[], pl.DataFrame]]


def _read_polars_whole(body: bytes, schema: object) -> tuple[pl.DataFrame | None, str | None]:
    """polars' reader on the whole page object (a one-row frame of a list of structs, exploded):
    the decoder the package dropped for the pieces; kept here as the comparison."""
    columns = schema.columns  # type: ignore[attr-defined]
    page = pl.read_json(body, schema={"results": pl.List(pl.Struct(columns)), "next_url": pl.String()})
    results = page.get_column("results")
    if results.null_count() or not results.list.len().item():
        return None, page.item(0, "next_url")
    return results.explode(empty_as_null=False).struct.unnest(), page.item(0, "next_url")


def decoder_cases(body: bytes) -> list[DecoderCase]:
    """Each decoder turns ``body`` (a quotes page) into the same typed frame."""
    schema = shape.RAW_QUOTES_SCHEMA
    page_schema = pages._PAGE_SCHEMAS["quotes"]

    def from_dicts(rows: list[dict]) -> pl.DataFrame:
        return pl.DataFrame(rows, schema=schema, strict=False)

    untyped = msgspec.json.Decoder()
    typed = msgspec.json.Decoder(_QuotesPage)

    def msgspec_typed() -> pl.DataFrame:
        rows = typed.decode(body).results
        arrays = [pa.array([getattr(r, name) for r in rows], type=_ARROW[dtype])
                  for name, dtype in schema.items()]
        return pl.from_arrow(pa.Table.from_arrays(arrays, names=list(schema)))  # type: ignore[return-value]

    def reader(read: Callable[..., tuple[pl.DataFrame | None, str | None]]) -> Callable[[], pl.DataFrame]:
        return lambda: read(body, page_schema)[0]  # type: ignore[return-value]

    return [
        ("stdlib json.loads + DataFrame(dicts)", lambda: from_dicts(json.loads(body)["results"])),
        ("orjson.loads + DataFrame(dicts)", lambda: from_dicts(orjson.loads(body)["results"])),
        ("msgspec untyped + DataFrame(dicts)", lambda: from_dicts(untyped.decode(body)["results"])),
        ("msgspec typed structs + Arrow columns", msgspec_typed),
        ("polars read_json, whole page", reader(_read_polars_whole)),
        ("polars read_json, 256 KiB pieces (parse_page)", reader(pages._read_pieces)),
        ("pyarrow.json, whole page (fallback)", reader(pages._read_arrow)),
    ]


def decoders(body: bytes, repeat: int) -> None:
    cases = decoder_cases(body)
    reference = parse_page("quotes", body)[0]
    n = reference.height
    rows = []
    with tempfile.NamedTemporaryFile(prefix="bench-page-", suffix=".json") as f:
        f.write(body)
        f.flush()
        for i, (name, fn) in enumerate(cases):
            c, w, df = cpu_of(fn, repeat)
            scaling = two_thread_speedup(fn)
            assert isinstance(df, pl.DataFrame)
            same = df.equals(reference)
            child = [sys.executable, os.path.abspath(__file__), "--decoder-peak", str(i), f.name]
            peak = subprocess.run(child, capture_output=True, text=True, timeout=120,
                                  check=True).stdout.split()[-1]
            rows.append((name, c * 1000, w * 1000, c * 1000 / (n / 1000), f"{scaling:.2f}", float(peak),
                         "yes" if same else "NO"))
    print(table(["decoder (+ typed polars frame)", "CPU ms", "wall ms", "CPU ms / 1k rows",
                 "2 threads / 1", "peak MB", "same frame"],
                rows, title=f"JSON decoders on one {n:,}-row quotes page ({len(body) / 1e6:.1f} MB), "
                            f"best of {repeat}; '2 threads / 1' = pages/s on two threads over one "
                            f"(2.0 = no GIL held); peak MB = growth of peak RSS while decoding it once"))


def decoder_peak(index: int, path: str) -> None:
    """Child: decode a page with decoder ``index`` (once to warm up), then print how far one more
    decode raises the peak RSS above the RSS before it, in MB (Linux: clear_refs resets VmHWM)."""
    _, fn = decoder_cases(Path(path).read_bytes())[index]
    fn()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    with open("/proc/self/status") as st:
        before = next(int(x.split()[1]) for x in st if x.startswith("VmRSS:")) / 1024
    fn()
    print(f"{vm_hwm_mb() - before:.1f}")


# ----------------------------------------------------------------------------------------------
# Peak RSS in a clean child process
# ----------------------------------------------------------------------------------------------
def rss_manifest(n: int) -> list[Event]:
    return make("in_play", n // 2) + make("isolated", n - n // 2)


def vm_hwm_mb() -> float:
    """Peak RSS of this address space (VmHWM); unlike ru_maxrss it does not carry the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(base_url: str, n: int, workers: int) -> None:
    events = rss_manifest(n)
    base_mb = vm_hwm_mb()
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        run = run_ours(base_url, events, 1000, tmp, workers=workers)
    print(json.dumps({"events": run.events, "requests": run.requests, "rows_raw": run.rows_raw,
                      "seconds": run.seconds, "base_mb": base_mb, "hwm_mb": vm_hwm_mb(),
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "errors": run.errors}))


def peak_rss(n: int, workers: int) -> None:
    events = rss_manifest(n)
    with SimHost() as sim:
        rows, cpu, _, _ = sim.warm(events)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", sim.base_url,
                               "--rss-events", str(n), "--workers", str(workers)],
                              capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        raise SystemExit("RSS child failed")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = max(res["maxrss_mb"], res["hwm_mb"])
    verdict = "OK" if peak < TARGET_RSS_MB else "ABOVE TARGET"
    print(table(
        ["run", "events", "requests", "raw rows", "seconds", "RSS after imports MB", "ru_maxrss MB",
         "VmHWM MB", "target"],
        [(f"FetchEngine, {workers} workers", res["events"], res["requests"], res["rows_raw"], res["seconds"],
          res["base_mb"], res["maxrss_mb"], res["hwm_mb"], f"< {TARGET_RSS_MB} MB: {verdict}")],
        title=f"Peak RSS of a child process (engine only; simulator in another process): {describe(events)}",
    ))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=6, help=f"dense ({SYMBOL}) events, end-to-end figures")
    p.add_argument("--mixed-events", type=int, default=150, help="clustered-manifest events, end-to-end "
                   "figures for typical small-cap pages (0 = skip)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rss-events", type=int, default=300)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--dir", help="where the write stage creates its files (default: a temporary "
                   "directory under TMPDIR); put it on the data directory's filesystem")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: e2e,decoders,rss")
    p.add_argument("--rss-child", metavar="BASE_URL", help=argparse.SUPPRESS)
    p.add_argument("--decoder-peak", nargs=2, metavar=("INDEX", "PAGE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.decoder_peak:
        decoder_peak(int(a.decoder_peak[0]), a.decoder_peak[1])
        return
    if a.rss_child:
        rss_child(a.rss_child, a.rss_events, a.workers)
        return
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    t0 = time.monotonic()
    print(f"load average at start: {load_average()}")
    if "rss" not in skip:  # first, while this parent process is still small
        peak_rss(a.rss_events, a.workers)
        print()
    if not {"e2e", "decoders"} <= skip:
        tune_malloc()  # as the engine does (after the RSS child started: it tunes its own)
        dense = dense_events(a.events)
        mixed = make("clustered", a.mixed_events) if a.mixed_events else []
        with SimHost() as sim:
            fetched = fetch_bodies(sim.base_url, dense)
            fetched_mixed = fetch_bodies(sim.base_url, mixed)
        if "e2e" not in skip:
            rows, per_k, desc = end_to_end(fetched, a.repeat, f"dense {SYMBOL}", a.dir)
            notes = [desc]
            verdicts = [f"dense {SYMBOL}: {per_k:.3f} ms -> {'OK' if per_k <= TARGET_MS else 'ABOVE TARGET'}"]
            if fetched_mixed:
                rows_m, per_m, desc_m = end_to_end(fetched_mixed, a.repeat, "mixed small caps", a.dir)
                rows += rows_m
                notes.append(desc_m + " (one range per event and endpoint)")
                verdicts.append(f"mixed: {per_m:.3f} ms -> {'OK' if per_m <= TARGET_MS else 'ABOVE TARGET'}")
            print(table(["data", "stage", "CPU ms", "wall ms", "CPU ms / 1k ticks"], rows,
                        title=f"CPU per 1,000 ticks, parse -> shape -> write (best of {a.repeat} per stage)"))
            for n in notes:
                print(f"  {n}")
            print(f"target <= {TARGET_MS:g} ms CPU per 1,000 ticks end to end: " + "; ".join(verdicts))
            where = a.dir or tempfile.gettempdir()
            print(f"  files were written under {where}; creating an event's directory and two files there "
                  f"(no fsync, no encoding) costs {create_probe(a.dir):.3f} ms CPU per event on this host")
            print()
        if "decoders" not in skip:
            page = next(b for _, kind, bodies in fetched if kind == "quotes" for b in bodies
                        if len(bodies) > 1)
            decoders(page, max(a.repeat, 3))
    print(f"\n(load average at end: {load_average()}; total {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
