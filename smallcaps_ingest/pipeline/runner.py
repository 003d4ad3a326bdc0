"""The fetch engine on its own thread, so that a stop of the step (SIGTERM, SIGINT, a run
termination) reaches it: Dagster raises the stop on the step's main thread only."""

import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import dagster as dg

from smallcaps_ingest.core.engine import FetchEngine, SymbolOutcome
from smallcaps_ingest.core.plan import Window

# After an interrupt, how long the step waits for the engine's requests in flight (their pages are
# not followed) and for the writes of what was fetched, before it lets the interrupt go on.
STOP_WAIT_SECONDS = 8.0


class EngineThread:
    """A ``FetchEngine`` run on its own thread, its outcomes handed to the step's thread.

    Dagster delivers SIGTERM, SIGINT and a run termination to a step as ``KeyboardInterrupt`` or
    ``DagsterExecutionInterruptedError`` on the step's main thread only (the executor relays the
    signal to step processes), here while it waits for the next outcome; the engine's threads
    would carry on fetching every remaining page. So whenever ``outcomes`` is left before the run
    ended, and when the step's resources are torn down (an interrupt may land while Dagster handles
    a yielded event, and then the asset is never resumed), the engine is stopped and given
    ``STOP_WAIT_SECONDS`` to finish its requests in flight and its writes.
    """

    def __init__(self, engine: FetchEngine, work: Mapping[str, Sequence[Window]]):
        self.engine = engine
        self._work = work
        self._done: queue.Queue[SymbolOutcome | None] = queue.Queue()
        self._crashed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="fetch-engine", daemon=True)

    def _run(self) -> None:
        try:
            self.engine.run(self._work, on_symbol_done=self._done.put)
        except BaseException as e:  # noqa: BLE001 - re-raised on the step's thread
            self._crashed.append(e)
        finally:
            self._done.put(None)

    def outcomes(self) -> Iterator[SymbolOutcome]:
        """Each symbol's outcome as it finishes; re-raises what crashed the engine."""
        self._thread.start()
        ended = False
        try:
            while (o := self._done.get()) is not None:
                yield o
            ended = True
        finally:
            if not ended:
                self.stop()
        if self._crashed:
            raise self._crashed[0]

    def stop(self) -> None:
        """Stop the engine and wait (bounded) for it; a repeated interrupt does not cut the wait."""
        self.engine.stop()
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while self._thread.is_alive() and (left := deadline - time.monotonic()) > 0:
            try:
                self._thread.join(timeout=left)
            except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError):
                continue  # the multiprocess executor relays the same stop to its step process
