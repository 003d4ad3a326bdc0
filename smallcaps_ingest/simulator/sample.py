"""Synthetic events for demos and tests, bundled as ``data/sample_events.parquet``.

The shape mimics what a real scanner emits so the whole pipeline gets exercised: mostly regular-hours
events plus pre-market, after-hours and a few off-hours ones, clusters of 2-3 events minutes apart
(their [-3, +7] min windows overlap), "in-play" days with 3-6 events spread over one symbol's day, a
couple of exact duplicate rows (dedup), an extra ``score`` column (carried through), BRK.B (a dot in
the symbol) and XELB (the illiquid symbol in the simulator). Seeded, so the output is deterministic.

Run ``python -m smallcaps_ingest.simulator.sample`` to (re)write the bundled file.
"""

from __future__ import annotations

import random
from datetime import date, datetime, time, timedelta
from pathlib import Path

import polars as pl

from smallcaps_ingest.core.trading_calendar import is_trading_day

__all__ = [
    "SAMPLE_EVENTS_PATH",
    "SAMPLE_EVENT_COUNTS",
    "SAMPLE_SYMBOLS",
    "main",
    "make_sample_events",
    "write_sample_events",
]

SAMPLE_EVENTS_PATH = Path(__file__).parent / "data" / "sample_events.parquet"
NY_TZ = "America/New_York"

# Unique events per symbol (before the duplicate rows are added); XELB is illiquid, so fewer events.
SAMPLE_EVENT_COUNTS: dict[str, int] = {
    "AAOI": 20,
    "BBIG": 22,
    "BRK.B": 14,
    "CLOV": 24,
    "DGLY": 18,
    "FCEL": 20,
    "GNUS": 22,
    "IDEX": 20,
    "KOSS": 24,
    "MARK": 18,
    "OCGN": 22,
    "SNDL": 24,
    "TLRY": 20,
    "WISA": 22,
    "XELB": 10,
}
SAMPLE_SYMBOLS: tuple[str, ...] = tuple(SAMPLE_EVENT_COUNTS)
_N_DUPLICATES = 3

# The trading days of 2024-01..2024-06 (no events on weekends or NYSE holidays).
_TRADING_DAYS: tuple[date, ...] = tuple(
    d for d in (date(2024, 1, 1) + timedelta(days=i) for i in range(182)) if is_trading_day(d)
)

# New York clock ranges (seconds after midnight, [lo, hi)) used to draw event times per session.
_SESSION_RANGES: dict[str, list[tuple[int, int]]] = {
    "PM": [(4 * 3600, 9 * 3600 + 30 * 60)],
    "RTH": [(9 * 3600 + 30 * 60, 16 * 3600)],
    "AH": [(16 * 3600, 20 * 3600)],
    "OFF": [(3 * 3600, 4 * 3600), (20 * 3600, 21 * 3600 + 30 * 60)],
}
_SESSION_WEIGHTS = {"PM": 0.16, "RTH": 0.68, "AH": 0.14, "OFF": 0.02}
_TYPES_BY_SESSION = {
    "PM": ["gap_up", "gap_up", "gap_down", "news", "volume_spike"],
    "RTH": ["volume_spike", "volume_spike", "halt_resume", "news"],
    "AH": ["news", "news", "volume_spike"],
    "OFF": ["news"],
}

Row = tuple[str, str, datetime, float]  # symbol, event_type, naive New York wall time, score


def _at(day: date, seconds: float) -> datetime:
    return datetime.combine(day, time()) + timedelta(seconds=seconds)


def _draw_time(rng: random.Random, day: date, session: str) -> datetime:
    lo, hi = rng.choice(_SESSION_RANGES[session])
    return _at(day, rng.randrange(lo, hi) + rng.randrange(1_000_000) / 1e6)


def _score(rng: random.Random) -> float:
    return round(rng.uniform(0.5, 10.0), 3)


def _in_play_day(rng: random.Random, symbol: str, n: int) -> list[Row]:
    """n (3-6) events spread over one day: a pre-market gap, RTH follow-through, maybe after-hours news."""
    day = rng.choice(_TRADING_DAYS)
    rows: list[Row] = [(symbol, "gap_up", _draw_time(rng, day, "PM"), _score(rng))]
    rth_slots = n - 1 - (1 if n >= 5 else 0)
    # Split RTH into equal slices so the spread events are (typically) hours apart, not clustered.
    width = (16 * 3600 - (9 * 3600 + 30 * 60)) / rth_slots
    for i in range(rth_slots):
        lo = 9 * 3600 + 30 * 60 + i * width
        secs = lo + rng.uniform(0.1, 0.9) * width
        rows.append((symbol, rng.choice(_TYPES_BY_SESSION["RTH"]), _at(day, secs), _score(rng)))
    if n >= 5:
        rows.append((symbol, "news", _draw_time(rng, day, "AH"), _score(rng)))
    return rows


def _cluster(rng: random.Random, symbol: str, n: int) -> list[Row]:
    """n (2-3) events 20 s - 4 min apart, e.g. a halt, its resume spike and the news behind it."""
    day = rng.choice(_TRADING_DAYS)
    session = rng.choices(["PM", "RTH", "AH"], weights=[0.2, 0.7, 0.1])[0]
    t = _draw_time(rng, day, session)
    t = min(t, _at(day, _SESSION_RANGES[session][0][1] - 15 * 60))  # keep the whole cluster in-session
    rows: list[Row] = []
    for _ in range(n):
        rows.append((symbol, rng.choice(["halt_resume", "volume_spike", "news"]), t, _score(rng)))
        t += timedelta(seconds=rng.uniform(20, 240))
    return rows


def _singles(rng: random.Random, symbol: str, n: int) -> list[Row]:
    sessions = rng.choices(list(_SESSION_WEIGHTS), weights=list(_SESSION_WEIGHTS.values()), k=n)
    return [
        (symbol, rng.choice(_TYPES_BY_SESSION[s]), _draw_time(rng, rng.choice(_TRADING_DAYS), s), _score(rng))
        for s in sessions
    ]


def _edge_rows() -> list[Row]:
    """Hand-placed events on boundaries that the pipeline must get right."""
    return [
        # Exactly the open, on the first weekday after the 2024-03-10 DST switch.
        ("AAOI", "volume_spike", datetime(2024, 3, 11, 9, 30), 7.5),
        # Last second of after-hours in winter: already the next day in UTC.
        ("KOSS", "news", datetime(2024, 1, 5, 19, 59, 59, 500_000), 3.25),
        # Exactly 04:00: first pre-market second.
        ("BRK.B", "gap_up", datetime(2024, 2, 2, 4, 0), 2.0),
    ]


def make_sample_events(seed: int = 7) -> pl.DataFrame:
    """Deterministic synthetic events: symbol, event_type, timestamp (us, America/New_York), score."""
    rng = random.Random(seed)
    rows: list[Row] = _edge_rows()
    for symbol, target in SAMPLE_EVENT_COUNTS.items():
        have = sum(1 for r in rows if r[0] == symbol)
        mine = _in_play_day(rng, symbol, rng.randint(3, 6))
        for _ in range(1 if target < 15 else 2):
            mine += _cluster(rng, symbol, rng.randint(2, 3))
        rows += mine + _singles(rng, symbol, target - have - len(mine))
    rows += rng.sample(rows, _N_DUPLICATES)  # exact duplicate rows, to exercise dedup

    symbols, types, stamps, scores = zip(*rows, strict=True)
    return (
        pl.DataFrame(
            {
                "symbol": pl.Series(symbols, dtype=pl.String),
                "event_type": pl.Series(types, dtype=pl.String),
                "timestamp": pl.Series(stamps, dtype=pl.Datetime("us")),
                "score": pl.Series(scores, dtype=pl.Float64),
            }
        )
        .with_columns(pl.col("timestamp").dt.replace_time_zone(NY_TZ))
        .sort(["timestamp", "symbol", "event_type"], maintain_order=True)
    )


def write_sample_events(path: str | Path = SAMPLE_EVENTS_PATH, seed: int = 7) -> Path:
    """Write ``make_sample_events(seed)`` to ``path`` (the bundled file by default)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_sample_events(seed).write_parquet(out)
    return out


def main() -> None:
    """CLI: rewrite the bundled sample and print a short summary."""
    out = write_sample_events()
    df = pl.read_parquet(out)
    dups = df.height - df.unique().height
    print(f"wrote {out}: {df.height} rows, {df['symbol'].n_unique()} symbols, {dups} duplicate rows")


if __name__ == "__main__":
    main()
