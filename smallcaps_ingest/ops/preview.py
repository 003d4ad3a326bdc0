"""``smallcaps-ingest plan``: what an ingest will cost, before any request.

From the manifest, the tree and the learned densities (``_state/density.json``), it walks the
engine's own planner (:func:`plan.plan_groups`, the same sequence ``FetchEngine`` follows) over
every event the engine would fetch (complete events on disk are left out, found by the status
scanner, ``layout.scan_symbol_dir``) and adds up the expected pages of every planned
range: requests by endpoint, rows and bytes written, and wall time at a request rate.

What it cannot know: a symbol with no learned density is planned on the priors (``PRIOR_DENSITY``),
and the engine's probe of such a symbol is taken to return what the priors predict (so the rest of
it is planned at level 1, with the over-fetch allowance, as the engine would once the probe is
written). Those symbols are counted under ``symbols_without_density``. Retries, 429s and pages
that hold fewer rows than ``limit`` are not in the estimate. Nothing is written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from smallcaps_ingest import layout
from smallcaps_ingest.config import Config
from smallcaps_ingest.core.plan import (
    KINDS,
    NS,
    PAGE_ROWS,
    DensityStore,
    Window,
    cumulative_rows,
    overfetch_allowance,
    plan_groups,
)

SESSIONS = ("PM", "RTH", "AH", "OFF")
# Bytes of a written file: a fixed part (footer, schema, empty pages) and a part per row, fitted on
# the simulator's ticks as store.encode_parquet writes them (benchmarks/plan_accuracy.py checks them).
FILE_BYTES = {"trades": 2_900, "quotes": 600}
ROW_BYTES = {"trades": 13.7, "quotes": 14.8}


class PreviewError(RuntimeError):
    """No manifest, or a manifest that cannot be read: the message says which and what to do."""


@dataclass
class Tally:
    """Figures of one session (or of the total). Requests are fractional per session: a range's
    pages are shared equally among the events it serves."""

    events_to_fetch: int = 0
    requests: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    rows: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    bytes: float = 0.0

    def as_dict(self, max_rps: float) -> dict[str, Any]:
        total = sum(self.requests.values())
        return {
            "events_to_fetch": self.events_to_fetch,
            "requests": {**{k: round(v) for k, v in self.requests.items()}, "total": round(total)},
            "seconds": round(total / max_rps, 1),
            "rows": {**{k: round(v) for k, v in self.rows.items()}, "total": round(sum(self.rows.values()))},
            "bytes": round(self.bytes),
        }


@dataclass(frozen=True)
class Settings:
    """The engine's planning settings, from ``Config`` (as the run would use them)."""

    max_rps: float
    max_overfetch: float = 4.0
    overfetch_rows: int | None = None  # None: plan.overfetch_allowance(max_rps)
    quotes_hz: float = 1.0

    @classmethod
    def from_config(cls, config: Config, max_rps: float | None = None) -> Settings:
        return cls(
            max_rps=max_rps if max_rps is not None else config.max_rps,
            max_overfetch=config.max_overfetch,
            overfetch_rows=config.overfetch_rows,
            quotes_hz=config.quotes_hz,
        )

    @property
    def allowance(self) -> int:
        if self.overfetch_rows is None:
            return overfetch_allowance(self.max_rps)
        return max(0, self.overfetch_rows)


def complete_events(data_dir: str, symbols: set[str]) -> dict[str, set[str]]:
    """Complete event ids (both files present) per symbol, from the tree's scanner."""
    return {
        sym: set(layout.scan_symbol_dir(path).complete)
        for sym, path in layout.list_symbol_dirs(data_dir)[0]
        if sym in symbols
    }


def read_manifest(
    data_dir: str, complete: Mapping[str, set[str]] | None = None
) -> tuple[dict[str, list[tuple[Window, str]]], int]:
    """(symbol -> [(window, session), ...] in manifest order, the manifest's event count) from
    ``manifest.parquet``, without the events ``complete`` (default: the status scanner's view of the
    tree, :func:`complete_events`) holds: they are left out in polars, before any Python object is
    made per event."""
    import polars as pl

    path = layout.manifest_path(data_dir)
    if not os.path.isfile(path):
        raise PreviewError(
            f"no manifest at {path}: materialize the manifest asset first "
            "(dagster asset materialize -m smallcaps_ingest --select manifest)"
        )
    need = ("event_id", "symbol", "ts_start", "ts_end", "session")
    try:
        df = pl.read_parquet(path, columns=list(need))
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
    todo = df.join(done, on=["symbol", "event_id"], how="anti", maintain_order="left").select(
        "event_id",
        "symbol",
        pl.col("ts_start").dt.cast_time_unit("ns").dt.epoch("ns"),
        pl.col("ts_end").dt.cast_time_unit("ns").dt.epoch("ns"),
        "session",
    )
    out: dict[str, list[tuple[Window, str]]] = {}
    for eid, sym, a, b, session in zip(*(todo[c].to_list() for c in need), strict=True):
        out.setdefault(sym, []).append((Window(eid, a, b), session))
    return out, df.height


def _quote_rows(seconds: float, raw: float, hz: float) -> float:
    """Expected rows of a quotes file whose window of ``seconds`` holds ``raw`` quotes: the grid's
    buckets from the window's first quote on (those before it are left out); with hz 0, the raw
    quotes."""
    if hz <= 0:
        return raw
    if raw <= 0 or seconds <= 0:
        return 0.0
    return max(0.0, seconds - seconds / raw) * hz


def estimate(
    manifest: Mapping[str, list[tuple[Window, str]]],
    complete: Mapping[str, set[str]],
    density: DensityStore,
    settings: Settings,
) -> dict[str, Any]:
    """The figures ``plan`` prints (see the module docstring). ``density`` is used as a scratch
    copy: a cold symbol's probe is recorded in it (never saved)."""
    total = Tally()
    sessions: dict[str, Tally] = {}
    without_density = 0
    allowance = settings.allowance
    for symbol, events in manifest.items():
        done = complete.get(symbol, set())
        todo = [(w, s) for w, s in events if w.event_id not in done]
        if not todo:
            continue
        session_of = {w.event_id: s for w, s in todo}
        if not density.known(symbol):
            without_density += 1
        at = {k: cumulative_rows(density.densities(symbol, k)) for k in KINDS}
        for windows, ranges, probe in plan_groups(
            symbol, [w for w, _ in todo], density, settings.max_overfetch, overfetch_rows=allowance
        ):
            for w in windows:
                tally = sessions.setdefault(session_of[w.event_id], Tally())
                secs = (w.end_ns - w.start_ns) / NS
                trades = at["trades"](w.end_ns) - at["trades"](w.start_ns)
                quotes = _quote_rows(
                    secs, at["quotes"](w.end_ns) - at["quotes"](w.start_ns), settings.quotes_hz
                )
                size = sum(FILE_BYTES.values()) + ROW_BYTES["trades"] * trades + ROW_BYTES["quotes"] * quotes
                for t in (tally, total):
                    t.events_to_fetch += 1
                    t.rows["trades"] += trades
                    t.rows["quotes"] += quotes
                    t.bytes += size
            for r in ranges:
                rows = at[r.kind](r.end_ns) - at[r.kind](r.start_ns)
                pages = max(1, math.ceil(rows / PAGE_ROWS))
                total.requests[r.kind] += pages
                share = pages / len(r.events)
                for w in r.events:
                    sessions[session_of[w.event_id]].requests[r.kind] += share
                if probe:  # the engine learns the symbol's level from its probe: here, the prior's
                    density.observe(symbol, r.kind, r.start_ns, r.end_ns, round(rows))
            if probe:
                at = {k: cumulative_rows(density.densities(symbol, k)) for k in KINDS}
    out = total.as_dict(settings.max_rps)
    out["max_rps"] = settings.max_rps
    order = [s for s in SESSIONS if s in sessions] + sorted(set(sessions) - set(SESSIONS))
    out["sessions"] = {s: sessions[s].as_dict(settings.max_rps) for s in order}
    out["symbols_to_fetch"] = sum(
        1 for sym, evs in manifest.items() if any(w.event_id not in complete.get(sym, ()) for w, _ in evs)
    )
    out["symbols_without_density"] = without_density
    out["events_complete"] = sum(len(evs) for evs in manifest.values()) - total.events_to_fetch
    return out


def preview(data_dir: str, settings: Settings, density_path: str | None = None) -> dict[str, Any]:
    """Read the manifest, the tree and the densities of ``data_dir``; estimate (nothing is written).

    Settings whose rate differs from the budget's are planned again at the budget too
    (``at_budget``): the over-fetch allowance, hence the plan, depends on the rate."""
    data_dir = os.path.abspath(data_dir)
    todo, events = read_manifest(data_dir)
    path = density_path or str(layout.state_dir(data_dir) / layout.DENSITY_FILE)
    out = estimate(todo, {}, DensityStore(path), settings)
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
