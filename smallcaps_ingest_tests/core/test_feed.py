"""The feed's order: symbol after symbol; a symbol parks on its probe and resumes, first parked
first, once its probe is written (benchmarks/README.md, D18: taking turns instead cost 6 %)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from smallcaps_ingest.core.feed import Feed


def _symbols(
    names: str, jobs: int
) -> tuple[dict[str, threading.Event], Callable[[str], Iterator[str | threading.Event]]]:
    """Each symbol: a probe job, the probe's event, then ``jobs`` more jobs."""
    probes = {s: threading.Event() for s in names}

    def jobs_of(s: str) -> Iterator[str | threading.Event]:
        yield f"{s}0"
        yield probes[s]
        for i in range(1, jobs + 1):
            yield f"{s}{i}"

    return probes, jobs_of


def _drain(feed: Feed[str]) -> list[object]:
    out = []
    while (item := feed.next()) is not Feed.END:
        out.append(item)
    return out


def test_a_ready_symbol_is_handed_out_to_its_end_before_the_next_ready_one():
    probes, jobs_of = _symbols("ABC", 3)
    feed = Feed(jobs_of, ["A", "B", "C"])
    assert [feed.next() for _ in range(3)] == ["A0", "B0", "C0"]  # every probe out, all parked
    assert feed.next() is None  # nothing to hand out until a probe is written
    probes["A"].set()
    assert [feed.next(), feed.next()] == ["A1", "A2"]  # the only ready symbol goes on
    probes["B"].set()
    probes["C"].set()
    # A goes on to its end; then B and C, first parked first
    assert _drain(feed) == ["A3", "A", "B1", "B2", "B3", "B", "C1", "C2", "C3", "C"]


def test_a_symbol_waiting_for_its_probe_lets_the_next_symbol_start():
    probes, jobs_of = _symbols("AB", 2)
    feed = Feed(jobs_of, ["A", "B"])
    assert [feed.next(), feed.next()] == ["A0", "B0"]
    probes["B"].set()  # B's probe is written first: B goes on alone, A stays parked
    assert [feed.next(), feed.next(), feed.next()] == ["B1", "B2", "B"]
    assert feed.next() is None
    probes["A"].set()
    assert _drain(feed) == ["A1", "A2", "A"]


def test_a_new_symbol_starts_only_when_no_parked_symbol_is_ready():
    probes, jobs_of = _symbols("AB", 1)
    feed = Feed(jobs_of, ["A", "B"])
    assert feed.next() == "A0"
    probes["A"].set()  # written before the feed moves on: A resumes, B waits its turn
    assert [feed.next(), feed.next(), feed.next()] == ["A1", "A", "B0"]
    assert feed.next() is None
    probes["B"].set()
    assert _drain(feed) == ["B1", "B"]


def test_symbols_without_probes_are_handed_out_one_after_another():
    def jobs_of(s: str) -> Iterator[str]:
        yield from (f"{s}{i}" for i in range(3))

    assert _drain(Feed(jobs_of, ["A", "B"])) == ["A0", "A1", "A2", "A", "B0", "B1", "B2", "B"]
