"""What the engine, the dispatch backend and the cluster controller share about the expert plane's health.

The backend marks a worker address down when an RPC to it fails or misses its deadline and raises
ExpertUnavailableError when an expert has no live replica left. The engine then holds the step and waits here
for the plane to change (a new routing table from the controller) or for recovery to be declared impossible.
Recovery is possible only while a controller holds a lease (renewed every tick): without one nobody replaces
workers, so waiting would be pointless.
"""

from __future__ import annotations

import threading
import time


class ExpertUnavailableError(RuntimeError):
    """No live replica of an expert answered; names the layer, expert and worker. The step is retryable."""


class ExpertPlane:
    """Down addresses, the routing table's generation, the controller's lease; thread-safe."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self.generation = 0  # bumped by every routing-table swap
        self.down: dict[str, str] = {}  # address -> why it was marked down (cleared by a swap)
        self.lease_until = 0.0  # monotonic time until which a controller promises to repair the plane
        self.unrecoverable: str | None = None  # set by the controller when it cannot repair (no capacity)

    def mark_down(self, address: str, reason: str) -> bool:
        """True when the address was not down yet."""
        with self._cv:
            if address in self.down:
                return False
            self.down[address] = reason
            self._cv.notify_all()
            return True

    def is_down(self, address: str) -> bool:
        return address in self.down

    def swapped(self) -> None:
        """A new routing table is live: every address in it starts healthy."""
        with self._cv:
            self.generation += 1
            self.down = {}
            self.unrecoverable = None
            self._cv.notify_all()

    def supervise(self, lease_s: float) -> None:
        with self._cv:
            self.lease_until = time.monotonic() + lease_s

    def supervised(self) -> bool:
        return time.monotonic() < self.lease_until

    def give_up(self, reason: str | None) -> None:
        """The controller's verdict: the plane cannot be repaired now (None: it can again)."""
        with self._cv:
            self.unrecoverable = reason
            self._cv.notify_all()

    def why_not_recoverable(self) -> str | None:
        """None while a controller is repairing the plane, else the reason no one will."""
        if self.unrecoverable:
            return self.unrecoverable
        if not self.supervised():
            return "no controller is replacing expert workers"
        return None

    def wait_for_change(self, generation: int, timeout_s: float) -> int:
        """Wait until the table generation differs from `generation` (or a verdict, or timeout); returns it."""
        with self._cv:
            self._cv.wait_for(lambda: self.generation != generation or self.unrecoverable, timeout_s)
            return self.generation

    def snapshot(self) -> dict:
        with self._cv:
            return {"generation": self.generation, "down": dict(self.down), "supervised": self.supervised(),
                    "unrecoverable": self.unrecoverable}
