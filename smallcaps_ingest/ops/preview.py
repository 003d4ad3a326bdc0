"""``smallcaps-ingest plan``: what an ingest will cost, before any request.

From the manifest, the tree and the learned densities (``_state/density.json``), it follows the
engine's own planner (:func:`plan.plan_groups`, the same sequence ``FetchEngine`` follows) over
every event the engine would fetch (complete events on disk are left out, found by the status
scanner, ``layout.scan_symbol_dir``) and adds up the expected pages of every planned
range: requests by endpoint, rows and bytes written, and wall time at a request rate. The
arithmetic runs over the whole manifest at once (:mod:`plan_estimate`).

What it cannot know: a symbol with no learned density is planned on the priors (``PRIOR_DENSITY``),
and the engine's probe of such a symbol is taken to return what the priors predict (so the rest of
it is planned at level 1, with the over-fetch allowance, as the engine would once the probe is
written). Those symbols are counted under ``symbols_without_density``. Retries, 429s and pages
that hold fewer rows than ``limit`` are not in the estimate. Nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smallcaps_ingest import layout, storage
from smallcaps_ingest.core.plan import DensityStore, Window
from smallcaps_ingest.ops.plan_estimate import (
    FILE_BYTES,
    ROW_BYTES,
    SESSIONS,
    Settings,
    Tally,
    estimate_frame,
)

__all__ = ["FILE_BYTES", "ROW_BYTES", "SESSIONS", "PreviewError", "Settings", "Tally", "estimate", "preview"]


class PreviewError(RuntimeError):
    """No manifest, or a manifest that cannot be read: the message says which and what to do."""


def complete_events(data_dir: str, symbols: set[str]) -> dict[str, set[str]]:
    """Complete event ids (both files present) per symbol, from the tree's scanner (on S3 one
    listing of the whole tree rather than one per symbol)."""
    if storage.is_remote(data_dir):
        return {s: set(d.complete) for s, d in layout.scan_tree(data_dir).symbols.items() if s in symbols}
    return {
        sym: set(layout.scan_symbol_dir(path).complete)
        for sym, path in layout.list_symbol_dirs(data_dir)[0]
        if sym in symbols
    }


def read_manifest(data_dir: str, complete: Mapping[str, set[str]] | None = None) -> tuple[Any, int]:
    """(the events to fetch: ``event_id``, ``symbol``, ``start_ns``, ``end_ns``, ``session``; the
    manifest's event count) from ``manifest.parquet``, without the events ``complete`` (default:
    the status scanner's view of the tree, :func:`complete_events`) holds, in polars column ops."""
    import polars as pl

    path = layout.manifest_path(data_dir)
    if not storage.isfile(path):
        raise PreviewError(
            f"no manifest at {path}: materialize the manifest asset first "
            "(dagster asset materialize -m smallcaps_ingest --select manifest)"
        )
    need = ("event_id", "symbol", "ts_start", "ts_end", "session")
    try:
        df = pl.read_parquet(storage.source(path), columns=list(need))
    except Exception as e:  # noqa: BLE001 - any unreadable manifest is reported, with its path
        raise PreviewError(f"cannot read the manifest {path} ({need}): {type(e).__name__}: {e}") from None
    if complete is None:
        complete = complete_events(data_dir, set(df["symbol"].unique().to_list()))
    done = pl.DataFrame(
        {
            "symbol": [s for s, ids in complete.items() for _ in ids],
            "event_id": [i for ids in complete.values() for i in ids],
        },
        schema={"symbol": pl.String, "event_id": pl.String},
    )
    todo = df.join(done, on=["symbol", "event_id"], how="anti") if done.height else df
    return todo.select(
        "event_id",
        "symbol",
        start_ns=pl.col("ts_start").dt.cast_time_unit("ns").dt.epoch("ns"),
        end_ns=pl.col("ts_end").dt.cast_time_unit("ns").dt.epoch("ns"),
        session="session",
    ), df.height


def estimate(
    manifest: Mapping[str, list[tuple[Window, str]]],
    complete: Mapping[str, set[str]],
    density: DensityStore,
    settings: Settings,
) -> dict[str, Any]:
    """The figures ``plan`` prints for ``manifest`` (symbol -> [(window, session), ...]) without
    the events of ``complete``; ``density`` is a scratch copy (a cold symbol's probe is recorded
    in it, never saved). See :func:`plan_estimate.estimate_frame`."""
    import polars as pl

    rows = [(w.event_id, sym, w.start_ns, w.end_ns, s) for sym, evs in manifest.items() for w, s in evs
            if w.event_id not in complete.get(sym, ())]  # fmt: skip
    todo = pl.DataFrame(rows, schema={"event_id": pl.String, "symbol": pl.String, "start_ns": pl.Int64,
                                      "end_ns": pl.Int64, "session": pl.String}, orient="row")  # fmt: skip
    out = estimate_frame(todo, density, settings)
    out["events_complete"] = sum(len(evs) for evs in manifest.values()) - out["events_to_fetch"]
    return out


def preview(data_dir: str, settings: Settings, density_path: str | None = None) -> dict[str, Any]:
    """Read the manifest, the tree and the densities of ``data_dir``; estimate (nothing is written).

    Settings whose rate differs from the budget's are planned again at the budget too
    (``at_budget``): the over-fetch allowance, hence the plan, depends on the rate."""
    data_dir = storage.absolute(data_dir)
    todo, events = read_manifest(data_dir)
    path = density_path or str(layout.state_dir(data_dir) / layout.DENSITY_FILE)
    out = estimate_frame(todo, DensityStore(path), settings)
    out["events_complete"] = events - out["events_to_fetch"]
    out["data_dir"] = data_dir
    return out


def _n(v: float) -> str:
    return f"{v:,.0f}"


def render_text(res: Mapping[str, Any]) -> str:
    """The estimate for people."""
    from smallcaps_ingest.ops.render import format_bytes, format_duration

    req = res["requests"]
    lines = [
        f"plan for {res['data_dir']} (no request made)",
        f"  events to fetch   {_n(res['events_to_fetch'])} over {_n(res['symbols_to_fetch'])} symbols "
        f"({_n(res['events_complete'])} complete on disk, skipped)",
        f"  requests          {_n(req['total'])}  (trades {_n(req['trades'])}, quotes {_n(req['quotes'])})",
        f"  wall time         {format_duration(res['seconds'])} at {res['max_rps']:g} req/s",
        f"  rows written      {_n(res['rows']['total'])}  (trades {_n(res['rows']['trades'])}, "
        f"quotes {_n(res['rows']['quotes'])})",
        f"  bytes on disk     {format_bytes(res['bytes'])}",
    ]
    if res["sessions"]:
        lines.append("  by session        events    requests    wall time       bytes")
        for name, s in res["sessions"].items():
            lines.append(
                f"    {name:<15} {_n(s['events_to_fetch']):>8} {_n(s['requests']['total']):>11} "
                f"{format_duration(s['seconds']):>12} {format_bytes(s['bytes']):>11}"
            )
    if res["symbols_without_density"]:
        lines.append(
            f"  {_n(res['symbols_without_density'])} symbols have no learned density yet: their figures come "
            "from the priors (cold estimates, within about +-50 % of requests on the simulator)"
        )
    return "\n".join(lines)
