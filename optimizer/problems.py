"""Render errors as RFC 9457 ``application/problem+json`` responses."""

from __future__ import annotations

import asyncio
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


def stop_reading_unwanted_body(request: web.BaseRequest, response: web.StreamResponse, linger: float) -> None:
    """Answer a refused upload without reading the rest of its body.

    aiohttp would read and discard the rest ("lingering") to keep the connection usable: ~4 ms of event
    loop CPU per refused 2.5 MB upload, which under a flood of clients retrying at once starves the
    requests being served. Instead: the body is marked finished, the socket is no longer read (the
    client's upload stalls on TCP flow control), the answer says ``Connection: close``, and the socket
    is closed ``linger`` seconds later. Clients that read the answer while they send (Go's net/http,
    aiohttp, curl) see the 503 or 413 at once and hang up themselves; one that reads only after sending
    everything sees the connection close after ``linger`` seconds.
    """
    if request.content.is_eof():
        return
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    # Not response.force_close(): aiohttp would then close the socket right after the answer, and with
    # body bytes still unread the kernel sends a reset the client may see instead of the 503 (measured:
    # 120 connection errors in 25 s of S2). The header tells the client; the timer below closes.
    response.headers["Connection"] = "close"
    request.content.feed_eof()
    # Drop what aiohttp had already buffered of the body (up to a few hundred KB): kept until the
    # socket closes, it added up to 1.6 GB under a flood of refused 2.5 MB uploads. Draining the buffer
    # makes aiohttp resume reading, so the transport is paused after it.
    if request.content.exception() is None:  # a failed stream (shutdown, reset) would re-raise here
        request.content.read_nowait()
    transport.pause_reading()
    asyncio.get_running_loop().call_later(linger, transport.close)
