"""Optional access control for the image routes: an API key header, a signed query string, CORS.

All three are off by default. Secrets are compared with ``hmac.compare_digest`` so that the time an
answer takes does not reveal how much of a guess was right.

Signing (``OPTIMIZER_SIGNING_KEY``): the client adds ``signature`` = hex HMAC-SHA256 of

    <request path> "?" <the other query parameters, sorted by name, URL-encoded as name=value joined by &>

and may add ``expires`` (Unix seconds), which is covered by the signature like any other parameter.
``sign()`` below computes it; a URL without a valid signature is refused with 403.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from urllib.parse import urlencode

from aiohttp import web
from multidict import MultiMapping

from optimizer.errors import BadSignature, OriginNotAllowed, Unauthorized

API_KEY_HEADER = "X-API-Key"
SIGNATURE_PARAM = "signature"
EXPIRES_PARAM = "expires"
# Query parameters consumed here, and so not passed on to the image parameters.
SECURITY_PARAMS = frozenset({SIGNATURE_PARAM, EXPIRES_PARAM})


def canonical_query(path: str, params: Iterable[tuple[str, str]]) -> bytes:
    pairs = sorted((name, value) for name, value in params if name != SIGNATURE_PARAM)
    return f"{path}?{urlencode(pairs)}".encode()


def sign(key: str, path: str, params: Mapping[str, str]) -> str:
    """The ``signature`` value for a request to ``path`` with these other query parameters."""
    return hmac.new(key.encode(), canonical_query(path, params.items()), hashlib.sha256).hexdigest()


def check_api_key(request: web.BaseRequest, keys: frozenset[str]) -> None:
    if not keys:
        return
    offered = request.headers.get(API_KEY_HEADER, "")
    if not offered:
        raise Unauthorized(f"send an API key in the {API_KEY_HEADER} header", header=API_KEY_HEADER)
    # Compare against every key, without stopping at the first match, so timing tells nothing.
    # aiohttp hands undecodable header bytes over as surrogates: encode them back, never fail on them.
    offered_bytes = offered.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(offered_bytes, key.encode())
    if not matched:
        raise Unauthorized("the API key is not accepted", header=API_KEY_HEADER)


def check_signature(request: web.BaseRequest, key: str, now: float | None = None) -> None:
    if not key:
        return
    query: MultiMapping[str] = request.query
    given = query.getall(SIGNATURE_PARAM, [])
    if len(given) != 1:
        raise BadSignature(f"sign the query string and send one '{SIGNATURE_PARAM}' parameter")
    expected = hmac.new(key.encode(), canonical_query(request.path, query.items()), hashlib.sha256)
    if not hmac.compare_digest(given[0].encode("utf-8", "surrogateescape"), expected.hexdigest().encode()):
        raise BadSignature("the signature does not match this path and query")
    expires = query.getall(EXPIRES_PARAM, [])
    if expires:
        try:
            deadline = int(expires[0])
        except ValueError:
            raise BadSignature(f"'{EXPIRES_PARAM}' must be Unix seconds") from None
        if deadline < (time.time() if now is None else now):
            raise BadSignature("the signed URL has expired")


class Cors:
    """CORS for browser uploads from the configured origins ("*" for any)."""

    EXPOSED = "X-Image-Width, X-Image-Height, Server-Timing, X-Request-ID, Retry-After"
    ALLOWED_HEADERS = f"Content-Type, {API_KEY_HEADER}, X-Request-ID"

    def __init__(self, origins: frozenset[str]) -> None:
        self.origins = origins

    @property
    def enabled(self) -> bool:
        return bool(self.origins)

    def allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.lower() in self.origins

    def decorate(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Add the CORS headers to an answer for an allowed origin (nothing for others). ``Vary: Origin``
        goes on every answer, with or without an ``Origin``: a shared cache must not hand a browser the
        copy it stored for a request that had none."""
        if not self.enabled or response.prepared:
            return
        varies = {
            name.strip().lower() for value in response.headers.getall("Vary", []) for name in value.split(",")
        }
        if "origin" not in varies:
            response.headers.add("Vary", "Origin")
        origin = request.headers.get("Origin")
        if origin is not None and self.allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = self.EXPOSED

    async def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin", "")
        if not self.allowed(origin):
            raise OriginNotAllowed(f"origin {origin!r} may not call this service")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": self.ALLOWED_HEADERS,
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            },
        )
