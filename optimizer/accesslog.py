"""One structured log line per request, whoever answered it (a handler, the middleware, the
``Expect: 100-continue`` hook)."""

from __future__ import annotations

import logging

from aiohttp import web

access_log = logging.getLogger("optimizer.access")


def log_request(request: web.BaseRequest, response: web.StreamResponse, code: str, seconds: float) -> None:
    fields: dict[str, object] = {
        "method": request.method,
        "path": request.path,
        "status": response.status,
        "bytes_in": request.content.total_bytes,
        "bytes_out": response.content_length or 0,
        "duration_ms": round(seconds * 1000, 1),
    }
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
