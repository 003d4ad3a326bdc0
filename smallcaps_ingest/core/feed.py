"""Hands out a run's jobs (the engine's :class:`Feed`): a symbol is parked on its probe so the
rest of it is planned on what the probe taught, and symbols whose probes are written take turns."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_TURN = threading.Event()  # a symbol that gave up its turn: ready again at once
_TURN.set()


class Feed(Generic[T]):
    """Hands out jobs, each symbol's in time order, the ready symbols' in turn.

    ``next()`` gives a job; a symbol's name once all its jobs were handed out; ``None``
    when nothing can be handed out until a probe is written; :data:`Feed.END` once every job was.
    A symbol whose plan yields a probe's ``done`` event is parked on it and the next symbol goes
    on, so the rest of a symbol is planned on what its probe taught (see ``plan.plan_groups``).
    Once a parked symbol's probe is written it is *ready*, and the ready symbols take turns, a
    job each, first parked first: a dense name's jobs (pages that take long to arrive and to
    decode) no longer hold back the sparse names' small requests that would keep the budget busy
    meanwhile (benchmarks/README.md, D18). A new symbol is started when no symbol is ready."""

    END = object()

    def __init__(self, jobs_of: Callable[[str], Iterator[T | threading.Event]], symbols: Iterable[str]):
        self._jobs_of = jobs_of
        self._upcoming = iter(list(symbols))
        self._parked: list[tuple[threading.Event, str, Iterator[T | threading.Event]]] = []
        self._items = self._generate()

    def next(self) -> T | str | None | object:
        return next(self._items, self.END)

    def _ready(self) -> tuple[threading.Event, str, Iterator[T | threading.Event]] | None:
        return next((p for p in self._parked if p[0].is_set()), None)

    def _generate(self) -> Iterator[T | str | None]:
        while True:
            ready = self._ready()
            if ready is not None:
                self._parked.remove(ready)
                _, symbol, jobs = ready
            else:
                symbol = next(self._upcoming, None)
                if symbol is None:
                    if not self._parked:
                        return
                    yield None
                    continue
                jobs = self._jobs_of(symbol)
            for item in jobs:
                if isinstance(item, threading.Event):
                    self._parked.append((item, symbol, jobs))
                    break
                yield item
                if self._ready() is not None:  # another symbol is ready: its turn
                    self._parked.append((_TURN, symbol, jobs))
                    break
            else:
                yield symbol  # every job of the symbol was handed out
