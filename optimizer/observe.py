"""What the operator learns from each request: its id, one structured log line, and the metrics.

Called once per request by whoever answered it (the middleware, or the ``Expect: 100-continue`` hook,
which aiohttp runs before any middleware).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import uuid

from aiohttp import web
from aiohttp.payload import Payload

from optimizer.metrics import ServiceMetrics

access_log = logging.getLogger("optimizer.access")

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID = web.RequestKey("optimizer_request_id", str)
# An incoming id is echoed only if it is short and plain, so it cannot forge log lines or headers.
_ACCEPTABLE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id(request: web.BaseRequest) -> str:
    """The client's ``X-Request-ID`` when it is acceptable, otherwise a new one; the same all request long."""
    if REQUEST_ID in request:
        return request[REQUEST_ID]
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    assigned = incoming if _ACCEPTABLE_ID.fullmatch(incoming) else uuid.uuid4().hex
    request[REQUEST_ID] = assigned
    return assigned


# Status logged for a client that disconnected before it could be answered (nginx's convention).
CLIENT_CLOSED = 499


def route_label(request: web.BaseRequest) -> str:
    """The route pattern, e.g. ``/img/optimize``: bounded, unlike the raw path. A CORS preflight is
    ``/img/optimize preflight``: counted with the uploads, its near-instant answers would pull their
    latency down and their rate up."""
    match_info = request.match_info if isinstance(request, web.Request) else None
    route = match_info.route if match_info is not None else None
    resource = route.resource if route is not None else None
    if resource is None:
        return "unmatched"
    return f"{resource.canonical} preflight" if request.method == "OPTIONS" else resource.canonical


# Of a client's own header, the most an access line keeps.
MAX_LOGGED_HEADER = 256

# How an IPv4 peer of a dual-stack ("::") listener is named by the kernel: ::ffff:a.b.c.d.
_MAPPED_PREFIX = "::ffff:"


def client_address(remote: str | None) -> str | None:
    """The peer as an operator greps for it: an IPv4 client of a dual-stack listener as a.b.c.d, the
    way the same client of an IPv4 listener (and any proxy's X-Forwarded-For) names it."""
    if remote is not None and remote[:7].lower() == _MAPPED_PREFIX:
        try:
            mapped = ipaddress.IPv6Address(remote).ipv4_mapped
        except ValueError:
            return remote
        return str(mapped) if mapped is not None else remote
    return remote


def record(
    request: web.BaseRequest,
    response: web.StreamResponse,
    code: str,
    seconds: float,
    metrics: ServiceMetrics,
) -> None:
    """Tag the response with the request id, then log the request and count it."""
    rid = request_id(request)
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = rid
    bytes_in = request.content.total_bytes
    bytes_out = response.content_length
    if bytes_out is None and isinstance(response, web.Response) and isinstance(response.body, Payload):
        bytes_out = response.body.size  # an image answer: aiohttp sets its length only once it is sent
    bytes_out = bytes_out or 0
    metrics.observe_request(
        route_label(request),
        response.status,
        seconds=seconds,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        code=code,
    )
    fields: dict[str, object] = {
        "request_id": rid,
        "method": request.method,
        "path": request.path,
        "status": response.status,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_ms": round(seconds * 1000, 1),
    }
    # Who asked, as nginx's combined log says it, so that an abusive client can be found: the peer,
    # the proxy's account of it (logged, never trusted), and the user agent. Client-chosen text is cut
    # short, so no client can make a line long.
    fields["client"] = client_address(request.remote)
    for name, header in (("forwarded_for", "X-Forwarded-For"), ("user_agent", "User-Agent")):
        if value := request.headers.get(header):
            fields[name] = value[:MAX_LOGGED_HEADER]
    if code:
        fields["code"] = code
    access_log.info(
        "%s %s %d %.1fms",
        request.method,
        request.path,
        response.status,
        seconds * 1000,
        extra={"fields": fields},
    )
