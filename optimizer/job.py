"""``Job``: one admitted request's claim on the service, and the one rule for giving it back.

A request holds a gate slot, possibly a memory reservation, and runs work in the pool. Cancelling an
``await`` on pool work does not stop the thread, so what the request holds may only be given back when
both are true: the handler is finished with it, and no thread is still working for it. Otherwise a
client that disconnects mid-decode would let the gate admit, and the budget promise, more than the
machine is really carrying.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from optimizer.budget import Reservation, uploads_in_use
from optimizer.errors import ShutdownDeadline
from optimizer.gate import Slot
from optimizer.nativelog import attributed
from optimizer.state import ServiceState

T = TypeVar("T")


def _timed(fn: Callable[..., T], submitted: float, request_id: str, *args: object) -> tuple[T, float, float]:
    """Runs in a worker: the result, seconds spent queued, seconds spent working."""
    started = time.perf_counter()
    try:
        with attributed(request_id):  # what C libraries write to fd 2 meanwhile names the request
            result = fn(*args)
    except StopIteration as exc:
        # asyncio cannot carry a StopIteration through a future: the request would hang, not fail.
        raise RuntimeError("StopIteration escaped from the image pipeline") from exc
    return result, started - submitted, time.perf_counter() - started


class Job:
    def __init__(
        self, slot: Slot, state: ServiceState, request_id: str, transport: asyncio.BaseTransport | None = None
    ) -> None:
        self._slot = slot
        self._state = state
        self._request_id = request_id
        self._transport = transport  # the client's connection: closing once it has left
        self._loop = asyncio.get_running_loop()
        self._reservation: Reservation | None = None  # the decode's
        self._upload: Reservation | None = None  # the upload's bytes in memory
        self._pending = 0
        self._handler_done = False
        self.queued = 0.0  # seconds waiting for a worker, all pool trips together
        self.busy = 0.0  # seconds in a worker; feeds the gate's Retry-After estimate
        self.budget_wait = 0.0  # seconds waiting for room in the memory budget

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the pool. Gives up waiting (503) at the drain deadline; if the handler is
        cancelled, a job no thread has started is dropped, and a started one keeps its claim until it
        ends."""
        pool = self._state.pool
        if pool is None:
            raise RuntimeError("the optimizer application has not been started")
        future = pool.submit(_timed, fn, time.perf_counter(), self._request_id, *args)
        self._pending += 1
        future.add_done_callback(self._ended_in_thread)
        waiting = asyncio.wrap_future(future, loop=self._loop)
        abandon = self._state.abandon_signal()
        try:
            await asyncio.wait((waiting, abandon), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            waiting.cancel()
            raise
        if not waiting.done():
            waiting.cancel()
            raise ShutdownDeadline()
        result, queued, _busy = waiting.result()
        self.queued += queued
        return result

    def claim_now(self, nbytes: int) -> bool:
        """From the worker thread running this job: hold ``nbytes`` of the memory budget if there is
        room right now (``False``: the handler waits for room with ``reserve``). Raises 413 for what can
        never fit. Set before the thread's work ends, the hold is released with the rest of the claim."""
        if self._reservation is not None:
            raise RuntimeError("the job already holds memory")
        if self._handler_done or self._state.abandoning or self.client_left():
            # Nobody will read the image (the client left, or the drain deadline passed): not worth a
            # decode. Plain reads of values the loop sets; at worst one more decode, as before.
            return False
        self._reservation = self._state.budget.try_reserve(nbytes)
        return self._reservation is not None

    @property
    def upload_bytes(self) -> int:
        return self._upload.nbytes if self._upload is not None else 0

    def hold_upload(self, received: int) -> None:
        """Count an upload's ``received`` bytes in the memory budget's allowance for uploads as they
        arrive; 503 at once past it. As they arrive, not from ``Content-Length`` before any does: heads
        declaring large bodies and sending none held the allowance until their read deadline, and a
        dozen could refuse every real upload (found in review). Uploads were outside the budget: 64
        clients posting 25 MB BMPs to 16 threads in a 1 GiB container held 1.6 GB and the kernel killed
        the process (found in review)."""
        more = received - self.upload_bytes
        if more <= 0:
            return
        held = self._state.budget.try_reserve_upload(more, self._upload)
        if held is None:
            raise uploads_in_use()
        self._upload = held

    def client_left(self) -> bool:
        """Whether the client's connection has closed. A host that does not cancel handlers when their
        clients leave (aiohttp's default) would otherwise have its queued jobs decoded for nobody: five
        decodes instead of one for four clients that timed out (found in review)."""
        return self._transport is not None and self._transport.is_closing()

    async def reserve(self, nbytes: int) -> None:
        """Hold ``nbytes`` of the memory budget for the rest of the job; gives up (503) at the drain
        deadline like ``run``, and (499) when the client has left, before the wait or during it."""
        if self._state.abandoning:
            raise ShutdownDeadline()
        if self.client_left():
            raise ConnectionResetError("the client left before its image was decoded")
        started = time.perf_counter()
        budget, wait = self._state.budget, self._state.settings.memory_wait
        # Room by now (freed since the worker looked): no task, and no extra turn of the event loop,
        # which under a flood of refusals takes ~20 ms.
        self._reservation = budget.try_reserve(nbytes)
        if self._reservation is not None:
            return
        reserving = asyncio.ensure_future(budget.reserve(nbytes, wait))
        try:
            await asyncio.wait((reserving, self._state.abandon_signal()), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            reserving.cancel()
            if reserving.done() and not reserving.cancelled() and reserving.exception() is None:
                reserving.result().release()  # granted just as the handler was cancelled
            raise
        if not reserving.done():
            reserving.cancel()
            raise ShutdownDeadline()
        self._reservation = reserving.result()
        self.budget_wait = time.perf_counter() - started
        if self.client_left():  # while it waited (found in review); the reservation goes with the job
            raise ConnectionResetError("the client left before its image was decoded")

    def finish(self) -> None:
        """The handler is done with the job (on every path, from its ``finally``)."""
        self._handler_done = True
        self._release_if_idle()

    def _ended_in_thread(self, future: concurrent.futures.Future[Any]) -> None:
        # Called in the worker thread (or wherever the future was cancelled): hop to the loop.
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
            self._loop.call_soon_threadsafe(self._ended, future)

    def _ended(self, future: concurrent.futures.Future[Any]) -> None:
        self._pending -= 1
        if not future.cancelled() and future.exception() is None:
            self.busy += future.result()[2]
        self._release_if_idle()

    def _release_if_idle(self) -> None:
        if not self._handler_done or self._pending:
            return
        if self._reservation is not None:
            self._reservation.release()
        if self._upload is not None:
            self._upload.release()
        self._slot.release(self.busy if self.busy > 0 else None)
