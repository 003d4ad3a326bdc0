"""Hands out a run's jobs symbol after symbol (the engine's :class:`Feed`), parking a symbol
on its probe so the rest of it is planned on what the probe taught."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Feed(Generic[T]):
    """Hands out jobs symbol after symbol, each symbol's in time order.

    ``next()`` gives a job; a symbol's name once all its jobs were handed out; ``None``
    when nothing can be handed out until a probe is written; :data:`Feed.END` once every job was.
    A symbol whose plan yields a probe's ``done`` event is parked on it and the next symbol goes
    on; parked symbols resume, first come first, as soon as their probe is written, so the rest
    of a symbol is planned on what its probe taught (see ``plan.plan_groups``)."""

    END = object()

    def __init__(self, jobs_of: Callable[[str], Iterator[T | threading.Event]], symbols: Iterable[str]):
        self._jobs_of = jobs_of
        self._upcoming = iter(list(symbols))
        self._parked: list[tuple[threading.Event, str, Iterator[T | threading.Event]]] = []
        self._items = self._generate()

    def next(self) -> T | str | None | object:
        return next(self._items, self.END)

    def _generate(self) -> Iterator[T | str | None]:
        while True:
            ready = next((p for p in self._parked if p[0].is_set()), None)
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
            else:
                yield symbol  # every job of the symbol was handed out
