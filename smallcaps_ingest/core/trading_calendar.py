"""NYSE trading days: which New York calendar days hold a session (weekdays that are no full-day holiday).

One small table for the years the data covers, shared by the simulator (no ticks on a closed day),
the planner (a closed day costs it nothing) and the manifest (an event on a closed day is ``OFF``).
A table rather than a rule engine: the exchange announces its holidays years ahead, and one-off
closures (the 2025-01-09 national day of mourning) follow no rule. The tests check it against the
``holidays`` package's NYSE calendar. Outside ``FIRST_YEAR``..``LAST_YEAR`` only weekends are closed.

Early closes (13:00 on the day before Independence Day, the day after Thanksgiving, Christmas Eve)
are not modelled: those days count as full sessions.

Stdlib only: the simulator imports it and must not import polars or Dagster.
"""

from __future__ import annotations

from datetime import date

__all__ = ["FIRST_YEAR", "HOLIDAYS", "LAST_YEAR", "is_trading_day"]

FIRST_YEAR, LAST_YEAR = 2019, 2027

#: NYSE full-day closures on weekdays, FIRST_YEAR..LAST_YEAR, as (month, day) per year (observed
#: dates: a holiday on a Saturday closes the Friday before, except New Year's Day; on a Sunday,
#: the Monday after).
_CLOSED: dict[int, tuple[tuple[int, int], ...]] = {
    2019: ((1, 1), (1, 21), (2, 18), (4, 19), (5, 27), (7, 4), (9, 2), (11, 28), (12, 25)),
    2020: ((1, 1), (1, 20), (2, 17), (4, 10), (5, 25), (7, 3), (9, 7), (11, 26), (12, 25)),
    2021: ((1, 1), (1, 18), (2, 15), (4, 2), (5, 31), (7, 5), (9, 6), (11, 25), (12, 24)),
    2022: ((1, 17), (2, 21), (4, 15), (5, 30), (6, 20), (7, 4), (9, 5), (11, 24), (12, 26)),
    2023: ((1, 2), (1, 16), (2, 20), (4, 7), (5, 29), (6, 19), (7, 4), (9, 4), (11, 23), (12, 25)),
    2024: ((1, 1), (1, 15), (2, 19), (3, 29), (5, 27), (6, 19), (7, 4), (9, 2), (11, 28), (12, 25)),
    2025: ((1, 1), (1, 9), (1, 20), (2, 17), (4, 18), (5, 26), (6, 19), (7, 4), (9, 1), (11, 27), (12, 25)),
    2026: ((1, 1), (1, 19), (2, 16), (4, 3), (5, 25), (6, 19), (7, 3), (9, 7), (11, 26), (12, 25)),
    2027: ((1, 1), (1, 18), (2, 15), (3, 26), (5, 31), (6, 18), (7, 5), (9, 6), (11, 25), (12, 24)),
}
HOLIDAYS: frozenset[date] = frozenset(date(y, m, d) for y, days in _CLOSED.items() for m, d in days)


def is_trading_day(day: date) -> bool:
    """Whether the New York calendar day ``day`` holds a session (pre-market, regular, after-hours)."""
    return day.weekday() < 5 and day not in HOLIDAYS
