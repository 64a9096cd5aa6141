"""``AdmissionGate``: how many requests may be inside the service at once, and nothing more.

A request takes a slot before its body is read and gives it back when its work has really ended: for
work handed to a thread, that is when the thread finishes, not when a cancelled handler stops waiting
(``optimizer.job`` enforces that). A full gate refuses at once rather than queueing without bound: the
caller answers 503 with a ``Retry-After`` estimated from the recent service times.

All methods must be called on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import math


class Slot:
    """One admitted request's place in the gate. Releasing it twice is harmless."""

    __slots__ = ("_gate", "_released")

    def __init__(self, gate: AdmissionGate) -> None:
        self._gate = gate
        self._released = False

    def release(self, service_seconds: float | None = None) -> None:
        """Give the slot back; ``service_seconds`` (time spent in a worker) feeds the Retry-After estimate."""
        if self._released:
            return
        self._released = True
        self._gate._leave(service_seconds)


class AdmissionGate:
    """Fail-fast admission: ``capacity`` slots, a running in-flight count, closable for draining."""

    # Weight of the newest service time in the moving average behind Retry-After.
    _EWMA_WEIGHT = 0.2

    def __init__(self, capacity: int, *, workers: int) -> None:
        if capacity < 1 or workers < 1:
            raise ValueError("capacity and workers must be at least 1")
        self.capacity = capacity
        self.workers = workers
        self._in_flight = 0
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._service_seconds = 0.0
        self.admitted_total = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def full(self) -> bool:
        return self._in_flight >= self.capacity

    def try_enter(self) -> Slot | None:
        """A slot, or ``None`` at once when the gate is full or closed. Never waits."""
        if self._closed or self._in_flight >= self.capacity:
            return None
        self._in_flight += 1
        self.admitted_total += 1
        self._idle.clear()
        return Slot(self)

    def close(self) -> None:
        """Admit nobody from now on (draining); the requests already inside carry on."""
        self._closed = True

    async def wait_idle(self, seconds: float) -> bool:
        """Wait until nothing is in flight; ``False`` if ``seconds`` passed first."""
        try:
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def retry_after(self) -> int:
        """Whole seconds (at least 1) until a slot is likely to be free: the work ahead of a newcomer,
        spread over the workers, at the recent average service time."""
        if self._service_seconds <= 0:
            return 1
        backlog = self._in_flight / self.workers * self._service_seconds
        return max(1, min(60, math.ceil(backlog)))

    def _leave(self, service_seconds: float | None) -> None:
        self._in_flight -= 1
        if service_seconds is not None and service_seconds >= 0:
            if self._service_seconds == 0:
                self._service_seconds = service_seconds
            else:
                weight = self._EWMA_WEIGHT
                self._service_seconds = (1 - weight) * self._service_seconds + weight * service_seconds
        if self._in_flight == 0:
            self._idle.set()
