"""Requests aiohttp's HTTP parser refuses, answered as problem+json like every other 4xx.

aiohttp answers a request it cannot parse itself, before any application code or middleware runs, and
in plain text: a request or header line over 8 KiB, a ``Content-Encoding`` it cannot decode (``br`` and
``zstd`` need packages not installed here), framing it cannot follow, bytes that are not HTTP. A client
that reads the service's JSON errors got a body it could not. ``ProblemRequestHandler`` is aiohttp's
``RequestHandler`` with that one answer changed; ``optimizer.listener`` builds the standalone server's
connections with it. An application that embeds the service keeps its own server's answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from optimizer.observe import client_address
from optimizer.problems import problem_response

# The detail quotes the parser's reason, which may quote the request: bounded, as a client could make it
# 8 KiB of anything.
MAX_DETAIL = 300

log = logging.getLogger("optimizer")


# Where a problem answer made here keeps its ``code``, for whoever counts it (``refused``).
PROBLEM_CODE = web.ResponseKey("optimizer_problem_code", str)


class ProblemRequestHandler(RequestHandler):
    """aiohttp's connection, with two things changed: the parser's refusals are problem+json, and a
    request head must arrive whole within ``head_timeout`` seconds.

    **The head's deadline.** aiohttp bounds nothing before a request head is complete but its idle
    timeout (3630 s, longer than load balancers keep idle connections): a client sending a header byte
    now and then, or nothing at all, held a connection and its file descriptor for an hour, and 260 of
    them under a limit of 256 descriptors made the service stop answering (found in review). As Go's
    ReadHeaderTimeout and nginx's client_header_timeout do, a new connection must send a whole head
    within the deadline, and so must one that starts a head after sitting idle between requests (the
    idle time itself stays aiohttp's). A head left unfinished gets 408 ``upload_stalled``; a connection
    that sent nothing is just closed.
    """

    # __weakref__: the listener keeps its connections in a WeakSet (``optimizer.listener``).
    __slots__ = (
        "__weakref__",
        "_head_deadline",
        "_head_started",
        "_head_timeout",
        "_problem",
        "_refused",
        "_waiting_since",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        refused: Callable[[web.StreamResponse], None] | None = None,
        head_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._refused = refused  # told of each problem sent (the service counts them)
        self._problem: web.StreamResponse | None = None  # made, not yet sent
        self._head_timeout = head_timeout
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_started = False  # bytes of the awaited head have arrived
        self._waiting_since = 0.0  # when the connection began to wait for its next request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._waiting_since = self._loop.time()
        self._arm_head_deadline()  # the first request's head, from the connection's start

    def waiting_since(self) -> float | None:
        """Since when (loop time) the connection has been waiting for a request, idle or with a head
        still arriving; ``None`` while a request is under way or queued, or once it is closing."""
        if self.transport is None or self._force_close or not self._keepalive or self._messages:
            return None  # gone, closing (a refused upload's connection lingers on its own), or busy
        return self._waiting_since if self._idle() or self._request_count == 0 else None

    def _idle(self) -> bool:
        """Between requests: aiohttp's loop waits for the next message."""
        return self._waiter is not None and not self._waiter.done()

    def data_received(self, data: bytes) -> None:
        idle = self._idle()
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._disarm_head_deadline()  # a head is whole (pipelined ones too)
        elif data and (idle or self._head_deadline is not None):
            self._head_started = True
            if self._head_deadline is None:
                self._arm_head_deadline()  # a head begins after the connection sat idle

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_timeout is not None and self._head_deadline is None:
            self._head_deadline = self._loop.call_later(self._head_timeout, self._head_too_late)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        self._head_started = False

    def _head_too_late(self) -> None:
        self._head_deadline = None
        transport = self.transport
        if transport is None or self.waiting_since() is None:
            return  # a request is under way after all (its body has deadlines of its own), or closing
        if self._head_started:
            problem = problem_response(
                408,
                "upload_stalled",
                "Request Timeout",
                f"the request's head did not arrive whole within {self._head_timeout:g} s",
            )
            problem.headers["X-Content-Type-Options"] = "nosniff"
            problem.headers["Connection"] = "close"
            problem[PROBLEM_CODE] = "upload_stalled"
            body = problem.body if isinstance(problem.body, bytes) else b""
            head = "".join(f"{name}: {value}\r\n" for name, value in problem.headers.items())
            transport.write(
                f"HTTP/1.1 408 Request Timeout\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            if self._refused is not None:
                self._refused(problem)
            # No request, so no access line: this one names the client, so that an operator can find who
            # keeps connections with heads half sent (a review found them in the metrics only).
            peer = transport.get_extra_info("peername")
            client = client_address(peer[0]) if isinstance(peer, tuple) and peer else None
            log.info(
                "a request head from %s did not arrive whole within %g s: answered 408",
                client or "?",
                self._head_timeout,
                extra={"fields": {"event": "head_timeout", "client": client, "status": 408}},
            )
        self.force_close()  # closes the transport once the answer, if any, is written

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own first: it logs the error (optimizer.server turns a client's into one warning
        # line) and refuses to answer once a response has begun.
        answer = super().handle_error(request, status, exc, message)
        if not 400 <= status < 500:
            return answer
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Bad Request"
        reason = " ".join(str(getattr(exc, "message", None) or message or title).split())
        if len(reason) > MAX_DETAIL:
            reason = reason[: MAX_DETAIL - 3] + "..."
        problem = problem_response(status, "bad_request", title, f"the request cannot be parsed: {reason}")
        problem.headers["X-Content-Type-Options"] = "nosniff"
        problem.force_close()  # as aiohttp's: the parser has lost its place in the connection
        problem[PROBLEM_CODE] = "bad_request"
        self._problem = problem
        return problem

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # Told once the answer has gone out: a client that reset the connection first got nothing, and
        # is not counted as answered (found in review).
        answered, reset = await super().finish_response(request, resp, start_time)
        self._waiting_since = self._loop.time()
        if resp is self._problem:
            self._problem = None
            if not reset and self._refused is not None:
                self._refused(resp)
        return answered, reset


def problem_handlers(
    server: web.Server,
    refused: Callable[[web.StreamResponse], None] | None = None,
    head_timeout: float | None = None,
) -> Callable[[], RequestHandler]:
    """A protocol factory like ``server`` itself (aiohttp's ``Server.__call__``), making
    ``ProblemRequestHandler`` connections with the server's own settings; ``refused`` is called with
    each problem answer they make."""
    loop: Any = server._loop
    kwargs: dict[str, Any] = server._kwargs

    def connection() -> RequestHandler:
        return ProblemRequestHandler(server, loop=loop, refused=refused, head_timeout=head_timeout, **kwargs)

    return connection
