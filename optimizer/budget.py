"""``MemoryBudget``: the memory the decodes (and unsent answers) may take, and beside it the uploads'.

Counting admission slots bounds memory only if every image costs the same, and they do not: a 22 Mpx
progressive JPEG makes libjpeg hold ~133 MB whatever the output size, while a baseline JPEG decoded at
1/8 scale costs a few MB. So once an upload's header has been read, its request reserves its estimated
decode cost here (``optimizer.pipeline.estimate_memory``) before a worker decodes it, and gives it back
when the worker is done. A request that does not fit waits (on the event loop, holding no thread, so
smaller images keep flowing past it) for up to ``wait`` seconds, then gets 503; one that could never fit
gets 413.

``try_reserve`` may be called from any thread: a worker that has just read an image's header claims its
memory there and goes straight on to decode it, without handing the job back to the event loop first
(``optimizer.handlers``). Waiting (``reserve``) and releasing happen on the event loop's thread only;
releases from worker threads are marshalled by the caller.
"""

from __future__ import annotations

import asyncio
import math
import threading

from optimizer.errors import Overloaded, OverMemoryBudget

# Uploads held in memory have an allowance of their own, this share of the budget, beside the decodes'
# room: a request holds its upload while it waits for decode room, so were uploads to take that room,
# each could wait for room only the others give back (two 5.6 MiB PNGs, each needing 15 MiB to decode
# in a 23.5 MiB budget, both waited out memory_wait and got 503, found in review). Apart, decodes
# never wait on uploads, and uploads never wait at all (a request over the allowance gets 503 at once).
# So the budget's worst case is 1.5 times it: with the default (half the memory limit), three quarters
# of the limit, the rest for the interpreter and what the estimate does not see.
UPLOAD_SHARE = 0.5


class Reservation:
    """Bytes held for one request: an upload's, or its decode's. Releasing twice is harmless."""

    __slots__ = ("_budget", "nbytes", "upload")

    def __init__(self, budget: MemoryBudget, nbytes: int, *, upload: bool = False) -> None:
        self._budget: MemoryBudget | None = budget
        self.nbytes = nbytes
        self.upload = upload

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.nbytes, upload=self.upload)


class MemoryBudget:
    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("the memory budget must be positive")
        self.total = total
        self.in_use = 0
        self.uploads = 0  # uploads held in memory, beside in_use (see UPLOAD_SHARE)
        self.peak = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._lock = threading.Lock()  # in_use and peak, for try_reserve from worker threads

    @property
    def upload_allowance(self) -> int:
        """What the uploads held in memory may take together, beside the budget's room for decodes."""
        return int(self.total * UPLOAD_SHARE)

    def try_reserve(self, nbytes: int) -> Reservation | None:
        """Hold ``nbytes`` to decode an image now if there is room, else ``None``; refuses what can never
        fit (413)."""
        if nbytes > self.total:
            raise OverMemoryBudget(
                f"decoding this image needs about {_mib(nbytes)} MiB; the service's memory budget is "
                f"{_mib(self.total)} MiB"
            )
        with self._lock:
            if self.in_use + nbytes > self.total:
                return None
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        return Reservation(self, nbytes)

    def refuse_upload(self, nbytes: int) -> None:
        """413 for an upload larger than the uploads' allowance; 503 when the others leave no room for
        it now. For a declared length before reading, so that a refused client sends no body."""
        if nbytes > self.upload_allowance:
            raise OverMemoryBudget(
                f"the upload is {_mib(nbytes)} MiB; the uploads held at once may take "
                f"{_mib(self.upload_allowance)} MiB (half the service's memory budget)"
            )
        if self.uploads + nbytes > self.upload_allowance:
            raise uploads_in_use()

    def try_reserve_upload(self, nbytes: int, held: Reservation | None = None) -> Reservation | None:
        """Hold ``nbytes`` more of an upload (added to ``held``, its earlier part) if the allowance has
        room, else ``None``; refuses an upload larger than the allowance (413)."""
        size = nbytes + (held.nbytes if held is not None else 0)
        if size > self.upload_allowance:
            self.refuse_upload(size)
        with self._lock:
            if self.uploads + nbytes > self.upload_allowance:
                return None
            self.uploads += nbytes
            if held is not None:
                held.nbytes += nbytes
                return held
        return Reservation(self, nbytes, upload=True)

    def hold(self, nbytes: int) -> Reservation:
        """Count ``nbytes`` that already exist (an answer not yet sent), room or not: what they take is
        then room the decodes wait for, not memory on top of the budget."""
        with self._lock:
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        return Reservation(self, nbytes)

    async def reserve(self, nbytes: int, wait: float) -> Reservation:
        """Hold ``nbytes`` to decode; waits up to ``wait`` seconds for room (503), refuses what cannot fit
        (413)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        # Not first-come-first-served on purpose: a small image that fits goes ahead of a large one
        # that is waiting for room, rather than queueing behind it.
        while (granted := self.try_reserve(nbytes)) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Overloaded(
                    "the service's memory budget is in use by other images; retry later",
                    retry_after=math.ceil(wait),  # clamped by Overloaded
                )
            waiter = loop.create_future()
            self._waiters.add(waiter)
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(waiter)
        return granted

    def _give_back(self, nbytes: int, *, upload: bool = False) -> None:
        with self._lock:
            if upload:
                self.uploads -= nbytes
            else:
                self.in_use -= nbytes
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


def uploads_in_use() -> Overloaded:
    """The 503 for an upload the allowance has no room for now: the others are using it."""
    return Overloaded("the memory for uploads is in use by other requests; retry later", retry_after=1)


def _mib(nbytes: int) -> int:
    return math.ceil(nbytes / (1024 * 1024))
