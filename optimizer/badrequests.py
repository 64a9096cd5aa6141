"""Requests aiohttp's HTTP parser refuses, answered as problem+json like every other 4xx.

aiohttp answers a request it cannot parse itself, before any application code or middleware runs, and
in plain text: a request or header line over 8 KiB, a ``Content-Encoding`` it cannot decode (``br`` and
``zstd`` need packages not installed here), framing it cannot follow, bytes that are not HTTP. A client
that reads the service's JSON errors got a body it could not. ``ProblemRequestHandler`` is aiohttp's
``RequestHandler`` with that one answer changed; ``optimizer.listener`` builds the standalone server's
connections with it. An application that embeds the service keeps its own server's answers.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from optimizer.problems import problem_response

# The detail quotes the parser's reason, which may quote the request: bounded, as a client could make it
# 8 KiB of anything.
MAX_DETAIL = 300


class ProblemRequestHandler(RequestHandler):
    __slots__ = ("_problem", "_refused")

    def __init__(
        self,
        manager: web.Server,
        *,
        refused: Callable[[web.StreamResponse], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._refused = refused  # told of each problem sent (the service counts them)
        self._problem: web.StreamResponse | None = None  # made, not yet sent

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
        self._problem = problem
        return problem

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # Told once the answer has gone out: a client that reset the connection first got nothing, and
        # is not counted as answered (found in review).
        answered, reset = await super().finish_response(request, resp, start_time)
        if resp is self._problem:
            self._problem = None
            if not reset and self._refused is not None:
                self._refused(resp)
        return answered, reset


def problem_handlers(
    server: web.Server, refused: Callable[[web.StreamResponse], None] | None = None
) -> Callable[[], RequestHandler]:
    """A protocol factory like ``server`` itself (aiohttp's ``Server.__call__``), making
    ``ProblemRequestHandler`` connections with the server's own settings; ``refused`` is called with
    each problem answer they make."""
    loop: Any = server._loop
    kwargs: dict[str, Any] = server._kwargs

    def connection() -> RequestHandler:
        return ProblemRequestHandler(server, loop=loop, refused=refused, **kwargs)

    return connection
