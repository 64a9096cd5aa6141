"""``AdmissionGate``: how many requests may be inside the service at once, and nothing more.

A request takes a slot before its body is read and gives it back when its work has really ended: for
work handed to a thread, that is when the thread finishes, not when a cancelled handler stops waiting
(``optimizer.job`` enforces that). A full gate refuses at once rather than queueing without bound: the
caller answers 503 with a ``Retry-After`` from ``refuse()``. Only while uploads are slow to arrive does
it let in up to one request per worker more (``read_ahead``, see ``full``).

**Taking turns.** Fail-fast admission is not fair on its own: a client whose image comes back asks for
the next one at once, on the same connection, and takes the slot it just freed before any refused client
is back; under a sustained overload of S1 (50 users, 6 slots), 13-20 of the 50 never got an image in
25 s. So the gate remembers when each refused client was told to return (its Retry-After), and
``turn_owed()`` says when enough of them will be back before the queued work runs out that the next
free slot can be left to one of them: the handler then refuses a connection it has just served instead
(``optimizer.handlers``). Retry-After grows with the clients waiting, so that together they return
about as fast as slots free up rather than all within the next second.

All methods must be called on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time

from optimizer.errors import MAX_RETRY_AFTER

# Retry-After tells the waiting clients to return this many times faster, together, than slots free up.
# 1: a slot nobody is back for goes to the client just served (no turn is owed then), so the workers do
# not run dry, and every return beyond the free slots is one more refusal: each costs the server and
# the client a connection and part of an upload. On S1 with the DC-scan decode (~26 images/s), 3
# instead of 1 made 43 refusals/s instead of 23 and 25.2 images/s instead of 26.3 (docs/benchmarks.md).
RETURN_SURPLUS = 1
# The longest Retry-After the count of waiting clients can make (the service-time estimate has its own).
# The count is of refusals, not of clients: clients that retry early or give up stay counted until
# they were due, and would pin every answer at this cap, so it is kept short.
MAX_WAITING_RETRY_AFTER = 5
# A turn is owed only when this many refused clients are due back before the queued work runs out, so
# that a slot left free is taken again before the workers could run dry. Fewer with a short queue (see
# ``turns_need``).
RETURNS_FOR_A_TURN = 3


class Slot:
    """One admitted request's place in the gate. Releasing it twice is harmless."""

    __slots__ = ("_gate", "_receiving", "_released")

    def __init__(self, gate: AdmissionGate) -> None:
        self._gate = gate
        self._receiving = True
        self._released = False

    def received(self, seconds: float | None = None) -> None:
        """The upload is in (or its read failed) after ``seconds``: the request no longer waits on the
        network."""
        if self._receiving:
            self._receiving = False
            self._gate._received(seconds)

    def release(self, service_seconds: float | None = None) -> None:
        """Give the slot back; ``service_seconds`` (time spent in a worker) feeds the Retry-After estimate."""
        if self._released:
            return
        self.received()
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
        self._receiving = 0  # admitted requests whose upload is still being read
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._service_seconds = 0.0
        self._read_seconds = 0.0  # moving average of the time an upload takes to arrive
        self.admitted_total = 0
        # When each refused client was told to come back (monotonic, sorted); the past ones are dropped.
        self._returns: list[float] = []

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def read_ahead(self) -> int:
        """How many requests beyond ``capacity`` may be admitted while uploads are slow to arrive: one
        per worker, at most the queue; upload memory stays within (capacity + read_ahead) x max body."""
        return min(self.workers, self.capacity - self.workers)

    @property
    def full(self) -> bool:
        """Every slot is taken, and, unless uploads are slow to arrive, the workers have work ready.

        A queued request whose upload is still arriving is no work for a worker that finishes. Under
        a flood of refusals the event loop took ~100 ms to receive an upload, against ~45 ms between
        two finished jobs, and the workers sat idle 11 % of the time for want of a received upload
        (docs/benchmarks.md). So while fewer uploads are in than there are workers, and uploads have
        lately taken longer to arrive than the workers take to finish one job each, up to
        ``read_ahead`` more requests are admitted to receive meanwhile. Clients whose uploads arrive
        quickly, as on S1 and S2, and a burst at start-up, before any job has finished, never see it.
        Only uploads that arrived whole feed the read-time average: a stalled one that ends in 408 says
        nothing about how fast uploads arrive."""
        if self._in_flight < self.capacity:
            return False
        if self._in_flight >= self.capacity + self.read_ahead:
            return True
        starved = self._in_flight - self._receiving < self.workers
        slow = self._read_seconds * self.workers > self._service_seconds > 0
        return not (starved and slow)

    def try_enter(self) -> Slot | None:
        """A slot, or ``None`` at once when the gate is full or closed. Never waits."""
        if self._closed or self.full:
            return None
        self._in_flight += 1
        self._receiving += 1
        self.admitted_total += 1
        self._idle.clear()
        return Slot(self)

    def close(self) -> None:
        """Admit nobody from now on (draining); the requests already inside carry on."""
        self._closed = True

    async def wait_idle(self, seconds: float) -> bool:
        """Wait until nothing is in flight; ``False`` if ``seconds`` passed first."""
        return await set_within(self._idle, seconds)

    def retry_after(self) -> int:
        """Whole seconds (at least 1) until a slot is likely to be free: the work ahead of a newcomer,
        spread over the workers, at the recent average service time."""
        if self._service_seconds <= 0:
            return 1
        backlog = self._in_flight / self.workers * self._service_seconds
        return max(1, min(MAX_RETRY_AFTER, math.ceil(backlog)))

    def refuse(self) -> int:
        """Record a refusal; its Retry-After in whole seconds: at least ``retry_after()``, and longer
        when many refused clients are waiting, so that together they return ``RETURN_SURPLUS`` times as
        fast as the workers free slots."""
        now = time.monotonic()
        waiting = self._waiting(now)
        seconds = self.retry_after()
        if self._service_seconds > 0:
            slots_per_second = self.workers / self._service_seconds
            spread = math.ceil((waiting + 1) / (RETURN_SURPLUS * slots_per_second))
            seconds = max(seconds, min(MAX_WAITING_RETRY_AFTER, spread))
        bisect.insort(self._returns, now + seconds)
        return seconds

    def waiting(self) -> int:
        """Refused clients told to come back later than now (the ``optimizer_waiting_clients`` gauge)."""
        return self._waiting(time.monotonic())

    @property
    def turns_need(self) -> int:
        """How many refused clients must be due back within the queued work for a turn to be owed.

        Returning at about the rate slots free up, about as many of them fall within that horizon as
        the queue has slots: 4 on two CPUs' defaults, 2 on one CPU's. ``RETURNS_FOR_A_TURN`` alone was
        then rarely met on one CPU, and on S1 with the server on one CPU (3 slots, 50 users) 23-25 users
        went without an image in 25 s; at one less than the queue, 15-22, for the same goodput and
        refusals (four alternating pairs; docs/benchmarks.md)."""
        return max(1, min(RETURNS_FOR_A_TURN, self.capacity - self.workers - 1))

    def turn_owed(self) -> bool:
        """Whether the next free slot should go to a refused client: at least ``turns_need`` of them
        are due back before the work already queued would run out."""
        if self._service_seconds <= 0:
            return False
        now = time.monotonic()
        self._waiting(now)
        # The work that keeps the workers busy meanwhile: the received uploads beyond one per worker (an
        # upload still arriving is no work yet; under the read-ahead there may be many).
        queued = max(0, self._in_flight - self._receiving - self.workers)
        horizon = now + queued * self._service_seconds / self.workers
        return bisect.bisect_right(self._returns, horizon) >= self.turns_need

    def _waiting(self, now: float) -> int:
        """Refused clients not yet due back; forgets the ones that are."""
        due = bisect.bisect_right(self._returns, now)
        if due:
            del self._returns[:due]
        return len(self._returns)

    def _received(self, seconds: float | None) -> None:
        self._receiving -= 1
        if seconds is not None and seconds >= 0:
            self._read_seconds = _moving_average(self._read_seconds, seconds, self._EWMA_WEIGHT)

    def _leave(self, service_seconds: float | None) -> None:
        self._in_flight -= 1
        if service_seconds is not None and service_seconds >= 0:
            self._service_seconds = _moving_average(self._service_seconds, service_seconds, self._EWMA_WEIGHT)
        if self._in_flight == 0:
            self._idle.set()


def _moving_average(average: float, value: float, weight: float) -> float:
    """The exponentially weighted average with ``value`` added; the first value is taken as it is."""
    return value if average == 0 else (1 - weight) * average + weight * value


async def set_within(event: asyncio.Event, seconds: float) -> bool:
    """Wait for ``event``; ``False`` if ``seconds`` passed first (the drain's waits)."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
