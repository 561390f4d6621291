"""Which model forwards are running, and whether one that may have started on an older routing table still is.

The placement controller drops a worker's experts only once no forward can still route to them: every forward
that started before the latest `swap_table` has ended (the router is idle, or only forwards that started on the
new table run). A forward counts from its entry into `Mixtral.forward`; one that entered before the swap is
counted as old even if its first layer picked up the new table, so the answer errs on the safe side.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from model.mixtral import Mixtral


class ForwardTracker:
    """Forwards numbered in start order; `swapped()` marks the last one that may run on the table before it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._started = 0  # forwards started so far (the last one's number)
        self._running: set[int] = set()
        self._swap_mark = 0  # forwards numbered up to this may be on an older table than the current one

    @contextmanager
    def forward(self) -> Iterator[None]:
        with self._cond:
            self._started += 1
            n = self._started
            self._running.add(n)
        try:
            yield
        finally:
            with self._cond:
                self._running.discard(n)
                self._cond.notify_all()

    def swapped(self) -> None:
        """Call right after the backend swapped its table: forwards started until now may use the old one."""
        with self._cond:
            self._swap_mark = self._started

    def old_in_flight(self) -> int:
        """Forwards still running that started before the latest swap."""
        with self._cond:
            return self._old()

    def wait_old_done(self, timeout_s: float) -> bool:
        """Wait up to timeout_s until no forward that started before the latest swap runs; True when none does."""
        with self._cond:
            return self._cond.wait_for(lambda: self._old() == 0, timeout=max(0.0, timeout_s))

    def _old(self) -> int:
        return sum(1 for n in self._running if n <= self._swap_mark)


class TrackedMixtral(Mixtral):
    """The router's model: every forward is counted by `tracker` (set after from_pretrained)."""

    tracker: ForwardTracker | None = None

    def forward(self, *args, **kwargs):
        if self.tracker is None:
            return super().forward(*args, **kwargs)
        with self.tracker.forward():
            return super().forward(*args, **kwargs)

    def forward_ping_pong(self, *args, **kwargs):
        if self.tracker is None:
            return super().forward_ping_pong(*args, **kwargs)
        with self.tracker.forward():
            return super().forward_ping_pong(*args, **kwargs)
