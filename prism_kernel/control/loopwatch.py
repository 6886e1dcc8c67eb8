"""How long the event loop goes without polling for I/O: the duration of
each of its iterations (the callbacks and task steps run between two
selector polls). The loop must never wait for the kernel (one writer thread
does that, control/sync.py); a kernel call on the loop would be one long
iteration, and every probe, confirmation and metrics heartbeat waits for it.

Measured at the selector, so it costs no wakeup of its own (a 20 ms timer
costs about 1 % of a core here: docs/design/one-writer.md). asyncio has no
public hook for this outside debug mode, so the selector object of the
running loop is wrapped; a loop without one (not a selector loop) is not
measured. The numbers are in the state file (`loop`); an iteration longer
than REPORT_OVER is logged (`loop_blocked`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

REPORT_OVER = 0.05  # seconds
RECENT = 60.0  # seconds: `longest_recent_ms` covers this window and the one before


class LoopWatch:
    def __init__(self, report: Callable[[float], None] | None = None, clock: Callable[[], float] = time.monotonic):
        """`report(seconds)` is called (on the loop) after an iteration longer than REPORT_OVER."""
        self._report = report
        self._clock = clock
        self.iterations = 0
        self.longest = 0.0
        self._recent: list[tuple[int, float]] = []  # (window, longest in it): the last two windows
        self._since: float | None = None  # when the last poll returned: the iteration runs from there
        self._selector: Any = None

    def start(self, loop: asyncio.AbstractEventLoop) -> bool:
        selector = getattr(loop, "_selector", None)
        if selector is None or not callable(getattr(selector, "select", None)):
            return False
        poll = selector.select
        self._selector = selector

        def select(timeout: float | None = None) -> Any:
            if self._since is not None:
                self._iteration(self._clock() - self._since)
            try:
                return poll(timeout)
            finally:
                self._since = self._clock()

        selector.select = select  # an instance attribute: shadows the class's method
        self._since = self._clock()
        return True

    def stop(self) -> None:
        if self._selector is not None:
            del self._selector.select  # the class's method again
            self._selector = None
        self._since = None

    def _iteration(self, seconds: float) -> None:
        self.iterations += 1
        if seconds > self.longest:
            self.longest = seconds
        window = int(self._clock() // RECENT)
        if self._recent and self._recent[-1][0] == window:
            if seconds > self._recent[-1][1]:
                self._recent[-1] = (window, seconds)
        else:
            self._recent = [*self._recent[-1:], (window, seconds)]
        if seconds > REPORT_OVER and self._report is not None:
            self._report(seconds)

    def stats(self) -> dict[str, Any]:
        recent = max((s for _, s in self._recent), default=0.0)
        return {"iterations": self.iterations, "longest_iteration_ms": round(self.longest * 1000, 1),
                "longest_recent_ms": round(recent * 1000, 1)}
