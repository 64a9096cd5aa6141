"""Render errors as RFC 9457 ``application/problem+json`` responses."""

from __future__ import annotations

import json

from aiohttp import web

from optimizer.errors import OptimizerError

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:optimizer:problem:"


def problem_response(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {
        "type": TYPE_PREFIX + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    response = web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )
    if headers and headers.get("Connection", "").lower() == "close":
        response.force_close()
    return response


def error_response(error: OptimizerError) -> web.Response:
    return problem_response(error.status, error.code, error.title, error.detail, error.headers)


# aiohttp's own refusals that reach the service's code, by status: (code, title).
_HTTP_CODES = {
    404: ("not_found", "Not Found"),
    405: ("method_not_allowed", "Method Not Allowed"),
    413: ("body_too_large", "Upload too large"),
}


def http_exception_response(exc: web.HTTPException) -> tuple[str, web.Response]:
    """An aiohttp refusal (404, 405, ...) as problem+json, and its code."""
    code, title = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return code, problem_response(exc.status, code, title, exc.reason, headers)
