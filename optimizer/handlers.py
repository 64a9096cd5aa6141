"""Thin views: parse parameters, admit, read the upload, run the pipeline off the loop, answer.

The order inside ``_optimize`` is the point: everything that can be refused cheaply (bad parameters,
a declared body over the cap, draining, a full gate) is refused before a byte of the body is read, and
what the request then holds (its gate slot, its memory reservation) is given back on every path, but
only once no worker thread is still busy for it (``optimizer.job``), so that a client that goes away
while its image is being processed cannot make the gate admit more work than the pool can run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from optimizer.errors import Draining, OptimizerError, Overloaded
from optimizer.intake import read_upload, refuse_declared_length
from optimizer.job import Job
from optimizer.linger import stop_reading_unwanted_body
from optimizer.observe import CLIENT_CLOSED, record, request_id
from optimizer.params import RouteDefaults, parse_params
from optimizer.pipeline import Limits, Output, Params, inspect, optimize
from optimizer.problems import error_response, http_exception_response
from optimizer.security import SECURITY_PARAMS, check_api_key, check_signature
from optimizer.sending import OutgoingImage
from optimizer.state import STATE, ServiceState

OPTIMIZE_DEFAULTS = RouteDefaults()
# The Go service's contract: a 300 px wide JPEG at quality 80, whatever the configured defaults; its
# Lanczos resize to 300 px enlarged narrower images too (a review found a 128 px image came back 128).
UPLOAD_DEFAULTS = RouteDefaults(width=300, format="jpeg", quality=80, enlarge=True)
# A request on a connection answered this recently is the same client asking again at once.
JUST_SERVED_SECONDS = 0.25


async def optimize_route(request: web.Request) -> web.StreamResponse:
    return await _optimize(request, OPTIMIZE_DEFAULTS)


async def upload_route(request: web.Request) -> web.StreamResponse:
    return await _optimize(request, UPLOAD_DEFAULTS)


# aiohttp wants a coroutine function as the Expect hook (not a partial): one per route.
async def optimize_expect(request: web.Request) -> web.StreamResponse | None:
    return await _expect_continue(request, OPTIMIZE_DEFAULTS)


async def upload_expect(request: web.Request) -> web.StreamResponse | None:
    return await _expect_continue(request, UPLOAD_DEFAULTS)


def finish(
    request: web.BaseRequest, response: web.StreamResponse, code: str, started: float, state: ServiceState
) -> web.StreamResponse:
    """What every answer gets before it leaves, whoever made it: nosniff, CORS, its log line and metrics;
    and whatever of the request's body is still unread stays unread (a refusal, but also a 404 or 405,
    which aiohttp would otherwise read to the end at full speed: 2 GB in 1.2 s to one 405)."""
    stop_reading_unwanted_body(request, response, state.lingering)
    if "Upgrade" in request.headers and not response.prepared:
        # The service upgrades to nothing, but aiohttp's parser takes whatever follows a request asking
        # to upgrade as the new protocol's: a request pipelined behind it would go unanswered, never
        # refused (found in review). Closing after the answer makes the client send it again.
        response.force_close()
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    state.cors.decorate(request, response)
    record(request, response, code, time.perf_counter() - started, state.metrics)
    return response


def _authorise(request: web.Request, state: ServiceState) -> None:
    check_api_key(request, state.settings.api_key_set)
    check_signature(request, state.settings.signing_key)


def _refuse_early(request: web.Request, state: ServiceState) -> None:
    """The capacity checks that need no body (see ``_before_the_body``)."""
    if state.gate.closed:
        raise Draining()
    refuse_declared_length(request, state.settings.max_body_bytes)
    if request.content_length:
        # The uploads held in memory have an allowance (optimizer.budget): refused before the body
        # when its declared length cannot fit, as the gate refuses when it is full.
        state.budget.refuse_upload(request.content_length)
    if state.gate.full:
        raise Overloaded(
            f"all {state.gate.capacity} slots are busy; retry later", retry_after=state.gate.refuse()
        )
    if _just_served(request, state) and state.gate.turn_owed():
        # This connection's last image has just come back, and refused clients are due back: the free
        # slot is theirs (see optimizer.gate, "Taking turns").
        state.metrics.turns.inc()
        raise Overloaded("other clients are waiting their turn; retry later", retry_after=state.gate.refuse())


def _just_served(request: web.BaseRequest, state: ServiceState) -> bool:
    """Whether this connection's last image came back moments ago: the same client asking again.

    Not behind a proxy (``Forwarded`` / ``X-Forwarded-For``): a proxy's pooled connection carries many
    clients, and would refuse whichever came next, often one returning for its turn."""
    if "Forwarded" in request.headers or "X-Forwarded-For" in request.headers:
        return False
    transport = request.transport
    served = state.served_at.get(transport) if transport is not None else None
    return served is not None and time.monotonic() - served < JUST_SERVED_SECONDS


async def _expect_continue(request: web.Request, defaults: RouteDefaults) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue`` with the final refusal, so a refused client uploads nothing."""
    state = request.app[STATE]
    started = time.perf_counter()
    try:
        _before_the_body(request, state, defaults)
    except OptimizerError as error:
        # aiohttp calls this hook before any middleware: the refusal is finished here the same way.
        return finish(request, error_response(error), error.code, started, state)
    return await continue_if_asked(request)


async def continue_if_asked(request: web.Request) -> web.StreamResponse | None:
    """The ``Expect`` hook of routes with nothing to refuse before a body, and the end of the image
    routes' own: ``100 Continue`` for ``100-continue``. Any other expectation is ignored (RFC 9110
    allows it) rather than left to aiohttp's default, a plain-text 417 that no middleware sees."""
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        try:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        except ConnectionResetError:
            # Gone before it was told to send. Logged and counted as any client gone; raised from
            # here, before any middleware, aiohttp logged an ERROR with a traceback, that any client
            # could repeat for free (found in review).
            gone = web.Response(status=CLIENT_CLOSED)
            return finish(request, gone, "client_closed", time.perf_counter(), request.app[STATE])
        # As aiohttp's own hook does: the interim answer is not the response. Counted, it would make
        # aiohttp take the response as begun, and a host's error after this would drop the connection
        # instead of answering it.
        request.writer.output_size = 0
    return None  # on to the handler


async def unmatched_expect(request: web.Request) -> web.StreamResponse | None:
    """The ``Expect`` hook of what no route matches (``optimizer.app``): the 404 or 405 itself, rather
    than ``100 Continue``, so that the client uploads nothing; whatever it expects.

    Not under a host, whose middlewares may still answer otherwise (``normalize_path_middleware``
    redirects ``/img/optimize/``; found in review): there only the plain-text 417 is left out."""
    refusal = request.match_info.http_exception
    if refusal is None or len(request.match_info.apps) > 1:
        return await continue_if_asked(request)
    code, response = http_exception_response(refusal)
    return finish(request, response, code, time.perf_counter(), request.app[STATE])


def _before_the_body(request: web.Request, state: ServiceState, defaults: RouteDefaults) -> Params:
    """Every check that needs no byte of the body (shared by the handler and the ``Expect`` hook)."""
    _authorise(request, state)
    consumed = SECURITY_PARAMS if state.settings.signing_key else frozenset()
    params = parse_params(request.query, state.settings, defaults, consumed)
    _refuse_early(request, state)
    return params


async def _optimize(request: web.Request, defaults: RouteDefaults) -> web.StreamResponse:
    state = request.app[STATE]
    params = _before_the_body(request, state, defaults)
    slot = state.gate.try_enter()
    if slot is None:  # lost the race for the last slot since _refuse_early
        raise Overloaded("all slots are busy; retry later", retry_after=state.gate.refuse())
    job = Job(slot, state, request_id(request), request.transport)
    try:
        read_started = time.perf_counter()
        state.reading.add(request.content)
        try:
            data = await read_upload(request, state.intake, job.hold_upload)
        except BaseException:
            slot.received()  # a failed read (408, 413, a client gone) is no measure of upload speed
            raise
        finally:
            state.reading.discard(request.content)
        read_seconds = time.perf_counter() - read_started
        slot.received(read_seconds)
        # One trip to a worker: the header, then the image if the memory budget has room for it.
        # Without room the worker hands the job back, and the wait happens here on the loop, so that no
        # worker thread sits idle holding a place.
        done = await job.run(_inspect_then_optimize, data, params, state.limits, job.claim_now)
        if isinstance(done, Output):
            output = done
        else:
            await job.reserve(done)
            output = await job.run(optimize, data, params, state.limits)
    finally:
        job.finish()
    if request.transport is not None:  # only an image marks the connection as served, not a 4xx
        state.served_at[request.transport] = time.monotonic()
    timing = {
        "read": read_seconds,
        "queue": job.queued,
        "budget": job.budget_wait,
        "decode": output.timings.decode,
        "resize": output.timings.resize,
        "encode": output.timings.encode,
    }
    state.metrics.observe_stages(timing)
    return _image_response(output, timing, state, request)


def _inspect_then_optimize(
    data: bytes, params: Params, limits: Limits, claim: Callable[[int], bool]
) -> Output | int:
    """In a worker: the header alone (allowlist, pixel limit, memory estimate), then, if ``claim``
    gets the memory, the whole image; else the bytes still to reserve.

    One trip instead of two: each trip waits for a free worker and for the event loop to come back
    to the job, and a worker that finished a header had nothing to do until then (~20 ms a turn under
    a flood of refusals: the flood's goodput 7.3 -> 8.0 images/s, docs/benchmarks.md)."""
    need = inspect(data, params, limits)
    if not claim(need):
        return need
    return optimize(data, params, limits)


def _image_response(
    out: Output, timing: dict[str, float], state: ServiceState, request: web.Request
) -> web.Response:
    server_timing = ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in timing.items())
    body = OutgoingImage(
        out.data,
        content_type=out.media_type,
        budget=state.budget,
        answers=state.answers,
        piece_seconds=state.settings.read_timeout,
        request_id=request_id(request),
    )
    return web.Response(
        body=body,
        headers={
            "X-Image-Width": str(out.width),
            "X-Image-Height": str(out.height),
            "Server-Timing": server_timing,
        },
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    gate = state.gate
    body = {
        "status": "ready" if state.ready else "draining",
        "in_flight": gate.in_flight,
        "capacity": gate.capacity,
    }
    return web.json_response(body, status=200 if state.ready else 503)
