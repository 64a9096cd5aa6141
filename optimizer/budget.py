"""``MemoryBudget``: the memory the uploads held and the decodes together may take.

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

# The most of the budget uploads held in memory may take together, so that the images they are for
# always have room to decode: were uploads to fill the budget, each would wait for decode memory that
# only the others could give back. A single upload may take more, up to the whole budget.
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
        self.uploads = 0  # of in_use: uploads held in memory
        self.peak = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._lock = threading.Lock()  # in_use and peak, for try_reserve from worker threads

    def try_reserve(self, nbytes: int, *, beside: int = 0) -> Reservation | None:
        """Hold ``nbytes`` to decode an image now if there is room, else ``None``; refuses what can never
        fit (413), ``beside`` the bytes its upload holds."""
        if nbytes + beside > self.total:
            upload = f" beside its {_mib(beside)} MiB upload" if beside else ""
            raise OverMemoryBudget(
                f"decoding this image needs about {_mib(nbytes)} MiB{upload}; the service's memory budget "
                f"is {_mib(self.total)} MiB"
            )
        with self._lock:
            if self.in_use + nbytes > self.total:
                return None
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        return Reservation(self, nbytes)

    def try_reserve_upload(self, nbytes: int, held: Reservation | None = None) -> Reservation | None:
        """Hold ``nbytes`` more of an upload (added to ``held``, its earlier part) if there is room, else
        ``None``; refuses an upload larger than the budget (413). Uploads take at most ``UPLOAD_SHARE``
        of the budget together, unless there is only one."""
        size = nbytes + (held.nbytes if held is not None else 0)
        if size > self.total:
            raise OverMemoryBudget(
                f"the upload is {_mib(size)} MiB; the service's memory budget is {_mib(self.total)} MiB"
            )
        with self._lock:
            others = self.uploads - (held.nbytes if held is not None else 0)
            if self.in_use + nbytes > self.total or (others and others + size > self.total * UPLOAD_SHARE):
                return None
            self.in_use += nbytes
            self.uploads += nbytes
            self.peak = max(self.peak, self.in_use)
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

    async def reserve(
        self, nbytes: int, wait: float, *, beside: int = 0, upload: bool = False
    ) -> Reservation:
        """Hold ``nbytes`` (to decode, ``beside`` an upload's bytes; or of an ``upload``); waits up to
        ``wait`` seconds for room (503), refuses what cannot fit (413)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        # Not first-come-first-served on purpose: a small image that fits goes ahead of a large one
        # that is waiting for room, rather than queueing behind it.
        while (
            granted := self.try_reserve_upload(nbytes) if upload else self.try_reserve(nbytes, beside=beside)
        ) is None:
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
            self.in_use -= nbytes
            if upload:
                self.uploads -= nbytes
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


def _mib(nbytes: int) -> int:
    return math.ceil(nbytes / (1024 * 1024))
