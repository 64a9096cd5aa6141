"""Receive the rest of a request body straight into the service's own buffer, past aiohttp's parser.

Why: on its way to the handler every ``recv()`` of an upload is copied once more by aiohttp's HTTP
parser (a new ``bytes`` per chunk, queued on the request's ``StreamReader``, whose flow control pauses
and resumes the socket around it), and the image's chunks are then joined into the one ``bytes``
object the decoder reads: two copies of the upload and ~70 trips through the parser on the event
loop for a 4.4 MB photo, whose CPU the workers lose on a busy machine. Measured with the image work
stubbed out (``scripts/transport_floor.py``, docs/benchmarks.md "The body past aiohttp's parser").

How: for a body whose length is declared (no chunked transfer, no content coding), what aiohttp has
already received is taken from its stream, and the connection's transport is switched to a
``BufferedProtocol`` (asyncio then reads with ``recv_into`` straight into the buffer given) until the
body's last byte. At that byte the transport goes back to aiohttp's protocol with a fresh parser: the
old one still counts the body's bytes, and the connection's next request must be read from its start.
The request's stream is then at its end, as if aiohttp had read the body itself.

The buffer is a ``bytes`` object allocated without being zeroed (``OwnBytes``), as C code builds one,
so the decoder gets the upload without a copy (``io.BytesIO`` shares a ``bytes`` it is given).

This reaches into aiohttp's ``RequestHandler`` (its parser, its read buffer size and its server's
keyword arguments) and into asyncio's socket transport. ``_switchable`` checks each of them, and where
one is missing the rest of the body is read from aiohttp's stream into the same buffer (the join is
still saved): behind TLS, on another event loop's transports (uvloop), in a host whose server was
built differently, or after an aiohttp release that changed them.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import StreamReader, hdrs, web
from aiohttp.http_parser import HttpRequestParser, HttpRequestParserPy
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from optimizer.badrequests import ProblemRequestHandler
from optimizer.errors import MalformedUpload


class BodyReadElsewhere(RuntimeError):
    """Part of the body was read by someone other than the service: a fault of the application it runs
    in, answered 500 and logged."""


try:  # the queue bound aiohttp gives its own parsers (3.14); older releases have none
    from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE
except ImportError:  # pragma: no cover - depends on the aiohttp release
    MAX_MSG_QUEUE_SIZE = 0

try:
    import ctypes

    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _bytes_address = ctypes.pythonapi.PyBytes_AsString
    _bytes_address.restype = ctypes.c_void_p
    _bytes_address.argtypes = (ctypes.py_object,)
except (ImportError, AttributeError):  # pragma: no cover - not CPython, or built without ctypes
    ctypes = None  # type: ignore[assignment]

# Set on a request whose body was abandoned part-way (see ``_Receiver``): its answer, whoever makes it,
# must close the connection (``optimizer.app`` looks at it as each answer is prepared).
BODY_ABANDONED = web.RequestKey("optimizer_body_abandoned", bool)

_PARSERS = frozenset({HttpRequestParser, HttpRequestParserPy})
_HANDLERS = frozenset({RequestHandler, ProblemRequestHandler})  # the latter changes only handle_error
_SOCKET_TRANSPORT: type | None = getattr(asyncio.selector_events, "_SelectorSocketTransport", None)


class OwnBytes:
    """A ``bytes`` object of ``size`` bytes to be filled through ``view``, then handed out by ``take``.

    CPython's ``PyBytes_FromStringAndSize(NULL, size)`` leaves the bytes unset, for the caller to fill
    before anyone else sees the object: what ``socket.recv()`` does itself. Nothing else holds the
    object until ``take()``, after every view of it is released, so it is immutable from then on. Without
    ctypes (another interpreter) the bytes are gathered in a ``bytearray`` and copied once by ``take``."""

    def __init__(self, size: int) -> None:
        self._data: bytes | bytearray
        if ctypes is not None:
            self._data = _new_bytes(None, size)
            raw = (ctypes.c_char * size).from_address(_bytes_address(self._data))
            self.view = memoryview(raw).cast("B")
        else:  # pragma: no cover - not CPython
            self._data = bytearray(size)
            self.view = memoryview(self._data)

    def take(self) -> bytes:
        """The bytes. Views sliced from ``view`` must have been released: they could still write."""
        self.view.release()
        data = self._data
        return data if isinstance(data, bytes) else bytes(data)


class _Filling:
    """Buffers filled one after another, in order."""

    def __init__(self, views: Sequence[memoryview]) -> None:
        self._views = [view for view in views if len(view)]
        self._at = 0  # into the first view

    @property
    def done(self) -> bool:
        return not self._views

    @property
    def remaining(self) -> int:
        return sum(len(view) for view in self._views) - self._at

    def space(self) -> memoryview:
        return self._views[0][self._at :]

    def advance(self, nbytes: int) -> None:
        self._at += nbytes
        if self._at == len(self._views[0]):
            self._views.pop(0)
            self._at = 0

    def close(self) -> None:
        """Releases the views left unfilled: nothing can write into the buffers through them any more."""
        for view in self._views:
            view.release()
        self._views.clear()

    def write(self, data: bytes) -> None:
        """Copies ``data`` in (what aiohttp had received before the switch)."""
        offset = 0
        while offset < len(data):
            space = self.space()
            n = min(len(space), len(data) - offset)
            space[:n] = data[offset : offset + n]
            offset += n
            self.advance(n)


def declared_body(request: web.BaseRequest) -> bool:
    """Whether the request's body is ``Content-Length`` bytes as sent: no chunked transfer and no content
    coding for aiohttp to undo, so that its length is known before it arrives."""
    headers = request.headers
    return (
        request.content_length is not None
        and hdrs.TRANSFER_ENCODING not in headers
        # Every Content-Encoding header, not the first: aiohttp's parser decodes by the last one, and a
        # body it decompresses is not Content-Length bytes long (a smuggled request, found in review).
        and all(value.strip().lower() == "identity" for value in headers.getall(hdrs.CONTENT_ENCODING, ()))
        and type(request.content) is StreamReader
    )


def _switchable(request: web.BaseRequest) -> bool:
    """Whether the connection's transport can be switched to a ``_Receiver`` and back."""
    protocol, transport = request.protocol, request.transport
    return (
        # Not any subclass: one that does its own work in data_received() would not see the body.
        type(protocol) in _HANDLERS
        and type(getattr(protocol, "_parser", None)) in _PARSERS
        and isinstance(getattr(protocol, "_read_bufsize", None), int)
        and isinstance(getattr(getattr(protocol, "_manager", None), "_kwargs", None), dict)
        and getattr(protocol, "_payload_parser", True) is None
        and not getattr(protocol, "_upgraded", True)
        and _SOCKET_TRANSPORT is not None
        and transport is not None
        and isinstance(transport, _SOCKET_TRANSPORT)
        and transport.get_extra_info("sslcontext") is None
        and transport.is_reading()
    )


class DirectBody:
    """The body of one request: chunks from aiohttp's stream (``readany``), until the caller takes the
    rest of it in one piece (``read_rest``), received past the parser where the connection allows.

    Only for a request ``declared_body`` accepted."""

    def __init__(self, request: web.BaseRequest, received: Callable[[], None]) -> None:
        assert request.content_length is not None
        self._request = request
        self._stream = request.content
        self._received = received
        self._handed = 0  # bytes handed out by readany()
        self._declared = request.content_length

    async def readany(self) -> bytes:
        chunk = await self._stream.readany()
        self._handed += len(chunk)
        return chunk

    @property
    def unread(self) -> int:
        """Bytes of the body not yet handed out."""
        return self._declared - self._handed

    async def read_rest(self, prefix: bytes | memoryview, size: int) -> tuple[bytes, bytes]:
        """``prefix`` (the unread end of the last chunk handed out) and the rest of the body, as two
        ``bytes``: the first ``size`` bytes, and what follows them."""
        total = len(prefix) + self.unread
        if not len(prefix) <= size <= total:
            raise ValueError(f"cannot cut {total} bytes after {size}")
        head = OwnBytes(size)
        tail = bytearray(total - size)
        filling = _Filling([head.view[len(prefix) :], memoryview(tail)])
        try:
            head.view[: len(prefix)] = prefix
            await self._fill(filling)
            self._handed = self._declared
        finally:
            filling.close()
            data = head.take()
        return data, bytes(tail)

    async def _fill(self, filling: _Filling) -> None:
        stream = self._stream
        # What aiohttp has received already. Taking it may let aiohttp resume a paused parser, which
        # then queues more: taken until nothing is left.
        while not filling.done and (chunk := stream.read_nowait()):
            filling.write(chunk)
            self._received()
        if filling.done:
            # All of it had arrived, so aiohttp's parser has ended the body itself.
            await stream.wait_eof()
            return
        if stream.is_eof() or filling.remaining != self._declared - stream.total_bytes:
            # Bytes of the body that aiohttp received went to another reader (a host's middleware): the
            # socket will not bring what the buffer still lacks, and switching to a receiver would hand
            # out an unfilled buffer as the upload (whatever that memory held: another client's image,
            # found in review) and eat the connection's next requests.
            raise BodyReadElsewhere(
                f"{self._declared - self._handed - filling.remaining} bytes of the request's body were "
                "read before the optimizer's handler got it (a host's middleware?)"
            )
        parser = _fresh_parser(self._request.protocol) if _switchable(self._request) else None
        if parser is None:
            # aiohttp's stream, chunk by chunk: its parser's copy stays, the join is still saved.
            while not filling.done:
                chunk = await stream.readany()
                if not chunk:  # aiohttp's parser ends a body at its declared length, not before
                    raise MalformedUpload("the request body ended before its declared length")
                filling.write(chunk)
                self._received()
            return
        transport = self._request.transport
        assert isinstance(transport, asyncio.Transport)
        receiver = _Receiver(
            self._request.protocol, transport, filling, stream, parser=parser, received=self._received
        )
        transport.set_protocol(receiver)
        try:
            # Ends at the body's last byte (the receiver ends the stream), or with the stream's error:
            # the connection lost, or the service shutting down (optimizer.app sets it).
            await stream.wait_eof()
        finally:
            if not filling.done:
                receiver.discard()
                self._abandoned()
        if not filling.done:  # the stream ended without the receiver: cannot be, but never hand it out
            raise BodyReadElsewhere("the request's body ended before the optimizer received all of it")

    def _abandoned(self) -> None:
        """The body will never be read to its end (a deadline, the shutdown, or a host that cancelled
        the handler and answers itself): whatever answer the request gets must close the connection,
        which ``optimizer.app`` sees to as the answer is prepared (a host's own answer went out
        keep-alive, aiohttp lingered 10 s for the rest of a body nothing passed on, and the client's
        next request on the connection went unanswered, found in review)."""
        self._request[BODY_ABANDONED] = True
        if self._stream.exception() is None:  # a late reader gets an error, not a body cut short
            self._stream.set_exception(ConnectionResetError("the request's body was abandoned"))


# Where a receiver puts what it reads once the body is abandoned (shared: nothing reads it).
_DISCARDED = memoryview(bytearray(64 * 1024))


class _Receiver(asyncio.BufferedProtocol):
    """The connection's protocol while the body is received; everything but the body's bytes goes on
    to aiohttp's protocol (``owner``), which gets the transport back at the body's end.

    A body abandoned before its end (a read deadline, the service shutting down, a host that cancels
    the handler and answers itself) never goes back: aiohttp's parser still expects the bytes taken
    here, and would take what the client sends next for them, so that a request could be parsed from
    the middle of one (found in review). The receiver keeps the connection and drops what it reads,
    which is what aiohttp's own lingering does with an unread body, until the connection closes: the
    answer says ``Connection: close`` and ``optimizer.linger`` stops reading and closes it, or, in a
    host, aiohttp's lingering ends and closes it."""

    def __init__(
        self,
        owner: RequestHandler,
        transport: asyncio.Transport,
        filling: _Filling,
        stream: StreamReader,
        *,
        parser: Any,
        received: Callable[[], None],
    ) -> None:
        self._owner = owner
        self._parser = parser
        self._transport = transport
        self._filling: _Filling | None = filling
        self._stream = stream
        self._received = received

    def discard(self) -> None:
        """From now on, what arrives is dropped (see the class's docstring)."""
        self._filling = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._filling.space() if self._filling is not None else _DISCARDED

    def buffer_updated(self, nbytes: int) -> None:
        filling = self._filling
        if filling is None:
            return
        self._stream.total_bytes += nbytes
        filling.advance(nbytes)
        try:
            # The byte cap and the uploads' allowance (optimizer.intake), before the body can end: once
            # its end is fed, an error set on the stream reaches nobody, and an upload whose last piece
            # crossed the allowance was answered 200 (found in review).
            self._received()
        except Exception as exc:  # raised here, asyncio would abort the connection unanswered
            self.discard()
            self._stream.set_exception(exc)
            return
        if filling.done:
            self._filling = None
            self._transport.set_protocol(self._owner)
            # The old parser still counts the body's bytes: the next request needs one of its own.
            self._owner._parser = self._parser
            self._stream.feed_eof()

    def eof_received(self) -> bool | None:
        # The client stopped sending before the body's end: aiohttp's protocol decides (it closes).
        self._owner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.discard()
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._owner.pause_writing()

    def resume_writing(self) -> None:
        self._owner.resume_writing()


def _fresh_parser(protocol: RequestHandler) -> Any:
    """A new parser for the connection's next request, built as aiohttp's ``RequestHandler`` builds its
    own (aiohttp 3.14, web_protocol.py); ``None`` if this aiohttp's parser takes other arguments."""
    kwargs: dict[str, Any] = protocol._manager._kwargs  # type: ignore[union-attr]
    parser_type: Any = type(protocol._parser)
    try:
        parser = parser_type(
            protocol,
            protocol._loop,
            protocol._read_bufsize,
            max_line_size=protocol.max_line_size,
            max_field_size=protocol.max_field_size,
            max_headers=protocol.max_headers,
            payload_exception=RequestPayloadError,
            auto_decompress=kwargs.get("auto_decompress", True),
            max_msg_queue_size=MAX_MSG_QUEUE_SIZE,
        )
    except TypeError:
        return None
    return parser
