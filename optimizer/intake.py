"""Read one upload into memory, under a byte cap and a read deadline.

The body is either multipart/form-data with a file part named ``image`` (the Go service's contract) or
the raw image bytes. It is streamed chunk by chunk (``request.post()`` would buffer it whole, and
aiohttp's ``client_max_size`` does not limit a streamed read), counting every byte of the request
body, so an oversized upload is refused as soon as it crosses the cap. A form is parsed by
``optimizer.formdata``, which copies the image's bytes once where aiohttp's reader copies them three
to four times. A body of declared length is received straight into the ``bytes`` the decoder reads,
past aiohttp's parser (``optimizer.takeover``): no copy at all on the event loop but the kernel's.

The read deadline works like Apache's mod_reqtimeout: the body has ``read_timeout`` seconds, and every
``min_upload_rate`` bytes received buy one more second. A stalled or trickling client therefore loses its
slot instead of holding it for ever, while a large upload on a slow but honest link still gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from optimizer.errors import BodyTooLarge, EmptyBody, MalformedUpload, UploadStalled
from optimizer.formdata import ChunkSource, FormReader, Pieces, boundary_of
from optimizer.takeover import BodyReadElsewhere, DirectBody, declared_body

FIELD_NAME = "image"
# What one recv() may take for an admitted upload (asyncio's default is 256 KiB; optimizer.server lowers
# it to 64 KiB for connections not yet admitted). Under a flood of refusals each turn of the event loop
# takes ~20 ms and an upload gets one recv() per turn: with 4 MiB a 2.5 MB upload arrives in a turn or
# two instead of ten, the next job is ready sooner, and the flood's goodput rose 6.5-6.7 -> 7.1-7.3
# images/s (S1 and S2 with polite clients unchanged; docs/benchmarks.md). CPython shrinks the buffer to
# what arrived.
UPLOAD_READ_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    max_bytes: int
    read_timeout: float
    min_rate: int


def refuse_declared_length(request: web.BaseRequest, max_bytes: int) -> None:
    """Refuse from ``Content-Length`` alone, before a byte of the body is read."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise BodyTooLarge(f"the upload is {length} bytes; the limit is {max_bytes}")


async def read_upload(
    request: web.BaseRequest, limits: IntakeLimits, hold: Callable[[int], None] | None = None
) -> bytes:
    """The uploaded image's bytes, or an ``OptimizerError`` (400, 408, 413). ``hold`` is told the bytes
    received so far after each chunk (the memory budget counts them), and may refuse more."""
    refuse_declared_length(request, limits.max_bytes)
    transport = request.transport
    if transport is not None and getattr(transport, "max_size", UPLOAD_READ_BYTES) < UPLOAD_READ_BYTES:
        # Large reads for this upload only (see optimizer.server.small_first_reads): afterwards the
        # connection reads with its previous size again, the class's small one unless the host (an
        # application embedding this one) had set its own, until its next request is admitted in turn.
        own = getattr(transport, "__dict__", {}).get("max_size")
        transport.max_size = UPLOAD_READ_BYTES  # type: ignore[attr-defined]
        try:
            return await _read_upload(request, limits, hold)
        finally:
            if own is not None:
                transport.max_size = own  # type: ignore[attr-defined]
            else:
                with contextlib.suppress(AttributeError):
                    del transport.max_size  # type: ignore[attr-defined]
    return await _read_upload(request, limits, hold)


async def _read_upload(
    request: web.BaseRequest, limits: IntakeLimits, hold: Callable[[int], None] | None
) -> bytes:
    stream = request.content
    loop = asyncio.get_running_loop()
    started = loop.time()

    def deadline() -> float:
        return started + limits.read_timeout + stream.total_bytes / limits.min_rate

    # The deadline moves with every chunk, but is only looked at when it falls due: a timer that finds
    # it moved sets itself again for the new one. Moving asyncio's timeout on each chunk instead made a
    # timer handle per recv() and left the old one cancelled in the loop's heap: 2.3 us a chunk, and a
    # 4.4 MB upload over a real network comes in a hundred chunks or more.
    try:
        async with asyncio.timeout_at(None) as timer:
            watchdog: asyncio.TimerHandle

            def watch() -> None:
                nonlocal watchdog
                due = deadline()
                if loop.time() < due:
                    watchdog = loop.call_at(due, watch)
                else:
                    timer.reschedule(due)  # already past: the timeout cancels the read now

            def received() -> None:
                if stream.total_bytes > limits.max_bytes:
                    raise BodyTooLarge(f"the upload is larger than the limit of {limits.max_bytes} bytes")
                if hold is not None:
                    hold(stream.total_bytes)

            watchdog = loop.call_at(deadline(), watch)
            try:
                source = _body_source(request, received)
                if _is_form(request):
                    data = await _read_multipart(request, source, received)
                else:
                    data = await _read_stream(source, received)
            finally:
                watchdog.cancel()
    except (web.RequestPayloadError, HttpProcessingError):
        # aiohttp decodes the transfer and content encodings as it reads: a body that is not the gzip
        # or chunked stream its headers announce fails here.
        raise MalformedUpload("the request body does not match its declared encoding") from None
    except TimeoutError:
        raise UploadStalled(
            f"the upload fell behind the read deadline ({stream.total_bytes} bytes received; "
            f"allowed: {limits.read_timeout:g} s plus 1 s per {limits.min_rate} bytes)"
        ) from None
    if not data:
        raise EmptyBody("the uploaded image is empty")
    return data


def _body_source(request: web.BaseRequest, received: Callable[[], None]) -> ChunkSource:
    """Where the body's bytes come from: aiohttp's stream, or for a body of declared length the
    decoder's own buffer (``optimizer.takeover``); in an application embedding the service, what a
    middleware of the host's has already read (an HMAC check, an audit log)."""
    already = getattr(request, "_read_bytes", None)  # aiohttp keeps what request.read() returned
    if isinstance(already, bytes):
        received()  # the cap and the uploads' allowance, as for bytes read here
        return _Replay(already)
    consumed = getattr(request.content, "_cursor", 0)  # bytes some other reader took from the stream
    if isinstance(consumed, int) and consumed > 0:
        # What is left would be parsed as the upload from its middle (a host's middleware peeked).
        raise BodyReadElsewhere(
            f"{consumed} bytes of the request's body were read before the optimizer's handler got it "
            "(a host's middleware?); only a body read whole with request.read() can be handed on"
        )
    return DirectBody(request, received) if declared_body(request) else request.content


class _Replay:
    """A body already in memory, as a source of one chunk."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def readany(self) -> bytes:
        data, self._data = self._data, b""
        return data


def _is_form(request: web.BaseRequest) -> bool:
    try:
        return request.content_type.startswith("multipart/")
    except (IndexError, ValueError):
        # aiohttp parses Content-Type with CPython's email header parser, which raises on some parameter
        # syntax (IndexError for "image/jpeg;a*", found by the hostile-header fuzz test).
        raise MalformedUpload("the Content-Type header cannot be parsed") from None


async def _read_stream(source: ChunkSource, received: Callable[[], None]) -> bytes:
    if isinstance(source, DirectBody) and source.unread:
        data, _ = await source.read_rest(b"", source.unread)
        return data
    # readany() hands over each chunk as the HTTP parser made it; read(n) would slice (copy) them.
    pieces = Pieces()
    while chunk := await source.readany():
        pieces.add(chunk)
        received()
    return pieces.join()


async def _read_multipart(
    request: web.BaseRequest, source: ChunkSource, received: Callable[[], None]
) -> bytes:
    boundary = boundary_of(request.headers.get(hdrs.CONTENT_TYPE, ""))
    return await FormReader(source, boundary, received).read_field(FIELD_NAME)
