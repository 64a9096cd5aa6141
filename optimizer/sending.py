"""An image answer on its way out: counted in the memory budget until sent, and given up when the client
stops reading it.

A job's memory reservation ends with its worker, but the encoded image then waits in the transport's
buffer until the client reads it, and nothing bounded that. A client that uploaded a 6.8 MB noise PNG,
asked for it as a 4500 px PNG and never read the answer kept 50 MB in the process for as long as it kept
the connection open: 18 such connections, 1.8 GB of RSS with nothing in flight (found in review). So
the answer goes out in pieces, each of which the client must take within ``read_timeout`` (the same
allowance an upload gets), and until it is all sent it counts in the memory budget: unread answers take
room the decodes then wait for, instead of memory on top of the budget.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import payload
from aiohttp.abc import AbstractStreamWriter

from optimizer.budget import MemoryBudget
from optimizer.gate import set_within

# Each piece must leave within the allowance: at the 10 s default, a client reading slower than ~26 KB/s
# is dropped. Larger than most answers (a few hundred KB at 800 px), which then go out in one write.
PIECE_BYTES = 256 * 1024

log = logging.getLogger("optimizer")


class ClientNotReading(ConnectionResetError):
    """The client took none of a piece of its answer in time; the connection has been aborted."""


class AnswersOut:
    """The image answers being sent, which a drain waits for as it waits for admitted work: a job gives
    its slot back once the image is made, before the answer goes out, and the shutdown then cut off a
    9.8 MB answer a client was reading at 600 KB/s, with exit code 0 and nothing in the log (found in
    review). ``cut`` counts the answers the shutdown cut off all the same: the runner's cancellation, at the
    standalone server's drain deadline or at an embedding host's own shutdown timeout."""

    def __init__(self) -> None:
        self.count = 0
        self.cut = 0
        self.draining = False  # set when the drain begins
        self._idle = asyncio.Event()
        self._idle.set()

    def started(self) -> None:
        self.count += 1
        self._idle.clear()

    def ended(self) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """Wait until no answer is being sent; ``False`` if ``seconds`` passed first."""
        return await set_within(self._idle, seconds)


class OutgoingImage(payload.Payload):
    """Not a ``BytesPayload``, which warns about large bodies written at once: this one is not."""

    _value: bytes

    def __init__(
        self,
        data: bytes,
        *,
        content_type: str,
        budget: MemoryBudget,
        answers: AnswersOut,
        piece_seconds: float,
        request_id: str,
    ) -> None:
        super().__init__(data, content_type=content_type)
        self._size = len(data)
        self._budget = budget
        self._answers = answers
        self._piece_seconds = piece_seconds
        self._request_id = request_id  # the access line, written when the answer was made, said 200

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._value.decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        """The image, for a host's middleware that reads answers (``response.body`` is this payload)."""
        return self._value

    async def write(self, writer: AbstractStreamWriter) -> None:
        data = memoryview(self._value)
        # Counted from the first byte sent, not from the response's making: an answer never sent (a host's
        # middleware replaced it, the handler was cancelled) then holds nothing.
        held = self._budget.hold(len(data))
        self._answers.started()
        start = 0
        try:
            for start in range(0, len(data), PIECE_BYTES):
                try:
                    async with asyncio.timeout(self._piece_seconds):
                        await writer.write(data[start : start + PIECE_BYTES])
                except TimeoutError:
                    transport = getattr(writer, "transport", None)
                    if transport is not None:
                        transport.abort()  # drops what is buffered: the memory comes back now
                    log.warning(
                        "dropped a connection whose client stopped reading its answer (%d of %d bytes "
                        "given to the transport)",
                        start,
                        len(data),
                        extra={
                            "fields": {
                                "event": "answer_abandoned",
                                "request_id": self._request_id,
                                "bytes_out": len(data),
                                "bytes_given": start,
                            }
                        },
                    )
                    raise ClientNotReading(
                        f"the client took less than {PIECE_BYTES} bytes of its answer in "
                        f"{self._piece_seconds:g} s"
                    ) from None
        except asyncio.CancelledError:
            # A client that left during the drain cancels its answer too (it was counted as cut, with
            # exit code 1, a review); aiohttp detaches such a connection from its server before it
            # cancels the handler, where the runner's shutdown cancels with the connection attached
            # (whether at the standalone server's drain deadline or at a host's own shutdown timeout,
            # which may come first: a review). Should aiohttp's internals differ, nothing is counted.
            attached = getattr(getattr(writer, "protocol", None), "_manager", None) is not None
            if self._answers.draining and attached:
                self._answers.cut += 1
                log.warning(
                    "the shutdown cut off an answer still being sent (%d of %d bytes given to the "
                    "transport); a longer drain deadline would have let it finish",
                    start,
                    len(data),
                    extra={
                        "fields": {
                            "event": "answer_cut_off",
                            "request_id": self._request_id,
                            "bytes_out": len(data),
                            "bytes_given": start,
                        }
                    },
                )
            raise
        finally:
            self._answers.ended()
            held.release()
