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
