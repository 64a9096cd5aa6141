"""``create_app(settings)``: a fresh, self-contained aiohttp application.

It works standalone and as a sub-app (``parent.add_subapp("/img", create_app(settings))``). Everything it
needs lives on the app: its own gate, its own thread pool (started and stopped by ``cleanup_ctx``, so a
parent's startup and cleanup drive it), its own drain (``on_shutdown``, which a parent's shutdown runs
too). It touches no signal handler, no environment variable and no process-wide Pillow setting; those
belong to whoever hosts it (``optimizer.server`` when it runs alone).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import SystemRoute, UrlMappingMatchInfo

from optimizer import handlers
from optimizer.errors import Draining, OptimizerError
from optimizer.linger import Lingering, stop_reading_unwanted_body
from optimizer.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from optimizer.observe import CLIENT_CLOSED, record
from optimizer.openapi import openapi_document
from optimizer.problems import error_response, http_exception_response, problem_response
from optimizer.settings import Settings
from optimizer.state import STATE, ServiceState
from optimizer.takeover import BODY_ABANDONED

log = logging.getLogger("optimizer")

POOL_START_SECONDS = 30.0


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings if settings is not None else Settings()
    # client_max_size only guards request.read()/post(); intake enforces the cap while streaming.
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_problems_and_access_log])
    app.router.__class__ = _Router  # no state of its own: only what no route matches changes
    app[STATE] = ServiceState.from_settings(settings)
    state = app[STATE]
    routes = (
        ("/optimize", handlers.optimize_route, handlers.optimize_expect),
        ("/upload", handlers.upload_route, handlers.upload_expect),
    )
    plain = handlers.continue_if_asked
    for path, handler, expect in routes:
        app.router.add_post(path, handler, expect_handler=expect)
        if state.cors.enabled:
            app.router.add_route("OPTIONS", path, state.cors.preflight, expect_handler=plain)
    app.router.add_get("/healthz", handlers.healthz, expect_handler=plain)
    app.router.add_get("/readyz", handlers.readyz, expect_handler=plain)
    app.router.add_get("/metrics", _metrics, expect_handler=plain)
    app.router.add_get("/openapi.json", _openapi, expect_handler=plain)
    app.cleanup_ctx.append(_worker_pool)
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(_closing_after_an_abandoned_body(state.lingering))
    return app


def _closing_after_an_abandoned_body(
    lingering: Lingering,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Whoever answers a request whose body was abandoned part-way (``optimizer.takeover``) closes the
    connection after the answer, as the service's own refusals do: a host that cancelled the handler
    and answered itself left it keep-alive, and the client's next request on it was lost (a review)."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        if request.get(BODY_ABANDONED):
            # Says Connection: close (the headers are still open to change here) and lingers, unless
            # the service's own answer did so already.
            stop_reading_unwanted_body(request, response, lingering)

    return hook


class _Router(web.UrlDispatcher):
    """aiohttp's router, with the service's ``Expect`` hook for what no route matches.

    aiohttp answers a path or method no route takes through a route of its own, whose ``Expect`` hook
    runs before any middleware: it said "100 Continue" to an upload it was about to refuse, and
    answered an expectation other than ``100-continue`` with a plain-text 417 that no log or metric saw
    (found in review). That route stays aiohttp's (a host's ``normalize_path_middleware`` looks for it;
    a catch-all route of the app's own broke its redirects, found in the next review); only its hook is
    the service's, which answers the 404 or 405 at once."""

    async def resolve(self, request: web.Request) -> UrlMappingMatchInfo:
        match = await super().resolve(request)
        route = match.route
        # A new route per unmatched request: changing its hook changes nothing else. Not one a sub-app
        # added to the service's app made (its apps are filled in on the way up): that app has no state
        # of the service's (found in review: a 500). Where a later aiohttp names the attribute
        # otherwise, its own hook stays (tests/test_lifecycle.py would say so).
        if isinstance(route, SystemRoute) and not match.apps and hasattr(route, "_expect_handler"):
            route._expect_handler = handlers.unmatched_expect
        return match


async def _metrics(request: web.Request) -> web.Response:
    response = web.Response(body=request.app[STATE].metrics.render())
    response.headers["Content-Type"] = METRICS_CONTENT_TYPE
    return response


async def _openapi(request: web.Request) -> web.Response:
    # Mounted as a sub-app, the routes live under the parent's prefix: say so in ``servers``.
    base_path = request.path.removesuffix("/openapi.json")
    return web.json_response(openapi_document(request.app[STATE].settings, base_path))


# Numbers each app's pool, so that two instances embedded in one host (or py-spy's view of it) tell
# their threads apart: optimizer-worker-1_0, optimizer-worker-2_0, ...
_POOL_NUMBERS = itertools.count(1)


async def _worker_pool(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    threads = state.settings.threads
    state.pool = ThreadPoolExecutor(
        max_workers=threads, thread_name_prefix=f"optimizer-worker-{next(_POOL_NUMBERS)}"
    )
    # Start every worker now rather than on first use: no request waits for a thread to start, and the
    # workers exist, at the start-up priority, before optimizer.server lowers the loop thread's.
    # (The pool starts a thread per submit while none is idle; the barrier keeps them all busy.)
    started = threading.Barrier(threads)
    try:
        await asyncio.gather(
            *(
                asyncio.wrap_future(state.pool.submit(started.wait, POOL_START_SECONDS))
                for _ in range(threads)
            )
        )
        yield
    finally:
        # Runs after the drain: anything still queued was abandoned, so drop it; a job still running in a
        # thread cannot be interrupted and ends on its own.
        state.pool.shutdown(wait=False, cancel_futures=True)
        if state.drain_timer is not None:
            state.drain_timer.cancel()


def begin_drain(app: web.Application) -> float:
    """Stop admitting, and fix the drain deadline (``drain_seconds`` from the first call): at it, what
    is still waiting is answered 503 ``shutdown_deadline``. Returns the deadline, in loop time. Does not
    wait: see ``drain``."""
    state = app[STATE]
    loop = asyncio.get_running_loop()
    state.ready = False
    state.gate.close()
    state.answers.draining = True
    if state.drain_deadline is None:
        state.drain_deadline = loop.time() + state.settings.drain_seconds
        if state.gate.in_flight or state.answers.count:
            log.info(
                "draining %d request(s) and %d answer(s) being sent, up to %.1f s",
                state.gate.in_flight,
                state.answers.count,
                state.settings.drain_seconds,
            )
        state.drain_timer = loop.call_at(state.drain_deadline, _deadline_passed, app)
    return state.drain_deadline


def _deadline_passed(app: web.Application) -> None:
    state = app[STATE]
    if state.gate.in_flight and not state.abandon_signal().done():
        state.abandoned = state.gate.in_flight
        log.warning(
            "drain deadline of %.1f s passed with %d request(s) unfinished; answering them 503",
            state.settings.drain_seconds,
            state.abandoned,
        )
        state.abandon_waiting_work()


async def drain(app: web.Application) -> bool:
    """Stop admitting, then give the requests already admitted until the drain deadline to finish,
    their answers sent.

    The deadline is ``drain_seconds`` from the first call; later calls wait for the same deadline, so a
    host may call this before its runner's cleanup. Returns ``True`` when everything admitted finished;
    otherwise what is still waiting is answered 503 ``shutdown_deadline`` and counted in ``abandoned``,
    and answers still being sent are left to the runner's cleanup (``answers.cut`` counts those cut).
    """
    state = app[STATE]
    deadline = begin_drain(app)
    loop = asyncio.get_running_loop()
    if await state.gate.wait_idle(max(0.0, deadline - loop.time())) and await state.answers.wait_idle(
        max(0.0, deadline - loop.time())
    ):
        return True
    _deadline_passed(app)  # at once, whether or not the timer has run yet
    return False


async def _on_shutdown(app: web.Application) -> None:
    # By the time a runner calls on_shutdown it has marked every connection as closing, and aiohttp
    # silently drops the bytes that arrive after that: an upload still in flight can never complete.
    # Answer those at once instead of letting them hold their slot until the deadline. (The standalone
    # server drains before the runner's cleanup, so there this only meets uploads the deadline cut off.)
    state = app[STATE]
    for stream in list(state.reading):
        if not stream.is_eof():  # one whose body has all arrived can still finish
            stream.set_exception(Draining("the service is shutting down; upload again elsewhere"))
    # Begin the drain, but do not wait here: a host's on_shutdown runs its sub-applications' one after
    # another, so two embedded instances waiting in turn would take the sum of their deadlines. The
    # runner then waits for the handlers still running (up to its shutdown_timeout, 60 s by default),
    # and each instance's timer answers what is left at its own deadline.
    begin_drain(app)


@web.middleware
async def _problems_and_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into problem+json, and write one log line per request."""
    started = time.perf_counter()
    state = request.app[STATE]
    code = ""
    try:
        response = await handler(request)
    except OptimizerError as error:
        code = error.code
        response = error_response(error)
    except web.HTTPException as exc:
        code, response = http_exception_response(exc)
    except ConnectionResetError:
        code = "client_closed"
        response = web.Response(status=CLIENT_CLOSED)
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client disconnects (handler_cancellation) or at the end
        # of the shutdown timeout; there is nobody left to answer, but the line is still logged.
        gone = web.Response(status=CLIENT_CLOSED)
        record(request, gone, "cancelled", time.perf_counter() - started, state.metrics)
        raise
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        code = "internal_error"
        response = problem_response(500, code, "Internal Server Error", "an unexpected error occurred")
    return handlers.finish(request, response, code, started, state)
