"""The OpenAPI 3.1 description served at ``/openapi.json``.

Built from the settings and the error tree, not written by hand beside them, so the limits it states
(largest dimension, accepted formats, status codes) are the ones the running instance enforces.
"""

from __future__ import annotations

from typing import Any

from optimizer import __version__
from optimizer.settings import OUTPUT_FORMATS, Settings

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": _PROBLEM_REF}},
    }
    if headers:
        response["headers"] = headers
    return response


def _image_operation(summary: str, description: str, settings: Settings, upload: bool) -> dict[str, Any]:
    dimension = {"type": "integer", "minimum": 1, "maximum": settings.max_dimension}
    parameters: list[dict[str, Any]] = [
        {"name": "width", "in": "query", "schema": dimension, "description": "fit inside this width"},
        {"name": "height", "in": "query", "schema": dimension, "description": "fit inside this height"},
        {
            "name": "format",
            "in": "query",
            "schema": {"type": "string", "enum": [*OUTPUT_FORMATS, "jpg"]},
            "description": "output format (default jpeg)",
        },
        {
            "name": "quality",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 100},
            "description": "encoder quality; PNG is lossless and ignores it",
        },
        {
            "name": "enlarge",
            "in": "query",
            "schema": {"type": "string", "enum": ["0", "1", "true", "false", "yes", "no"]},
            "description": "allow upscaling (default 0; 1 on /upload, whose Go original always made 300 px)",
        },
    ]
    if settings.signing_key:
        parameters += [
            {
                "name": "signature",
                "in": "query",
                "required": True,
                "schema": {"type": "string"},
                "description": "hex HMAC-SHA256 of the path and the other parameters, sorted",
            },
            {
                "name": "expires",
                "in": "query",
                "schema": {"type": "integer"},
                "description": "Unix seconds after which the signature is refused",
            },
        ]
    binary = {"type": "string", "format": "binary"}
    retry_after = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds, at least 1"}}
    operation: dict[str, Any] = {
        "summary": summary,
        "description": description,
        "operationId": "upload" if upload else "optimize",
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"image": binary},
                        "required": ["image"],
                    },
                },
                "application/octet-stream": {"schema": binary},
                "image/*": {"schema": binary},
            },
        },
        "responses": {
            "200": {
                "description": "the optimized image",
                "headers": {
                    "X-Image-Width": {"schema": {"type": "string"}},
                    "X-Image-Height": {"schema": {"type": "string"}},
                    "Server-Timing": {"schema": {"type": "string"}},
                },
                "content": {f"image/{name}": {"schema": binary} for name in OUTPUT_FORMATS},
            },
            "400": _problem(
                "invalid_parameter, empty_body, missing_image, malformed_upload or bad_request (see `code`)"
            ),
            "408": _problem("upload_stalled: the upload fell behind the read deadline"),
            "413": _problem(
                f"body_too_large (over {settings.max_body_bytes} bytes), too_many_pixels "
                f"(over {settings.max_pixels} pixels, a TIFF tile included) or over_memory_budget (one "
                "image that could never fit the memory budget, or one upload the uploads' allowance)"
            ),
            "415": _problem(
                "unsupported_format: accepted inputs are " + ", ".join(sorted(settings.input_formats))
            ),
            "422": _problem("corrupt_image: an accepted format that does not decode"),
            "401": _problem("unauthorized: API keys are configured and none valid was sent"),
            "403": _problem("bad_signature: URL signing is configured and the signature is not valid"),
            "503": _problem(
                "overloaded (every slot busy, or this connection was just served while refused clients are "
                "due back, or no room in the memory budget within its wait, or the uploads' allowance full; "
                "with Retry-After), draining "
                "or shutdown_deadline (Connection: close)",
                retry_after,
            ),
        },
    }
    if settings.api_key_set:
        operation["security"] = [{"apiKey": []}]
    return operation


def _preflight() -> dict[str, Any]:
    return {
        "summary": "CORS preflight",
        "responses": {
            "204": {"description": "the origin may call this route"},
            "403": _problem("origin_not_allowed"),
        },
    }


def _json_get(summary: str, schema: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": summary, "content": {"application/json": {"schema": schema}}}
    }
    responses.update(extra or {})
    return {"summary": summary, "responses": responses}


def openapi_document(settings: Settings, base_path: str = "") -> dict[str, Any]:
    """The document for an instance mounted at ``base_path`` (empty when it runs alone)."""
    document = _document(settings, base_path)
    if settings.cors_origin_set:
        for path in ("/optimize", "/upload"):
            document["paths"][path]["options"] = _preflight()
    return document


def _document(settings: Settings, base_path: str) -> dict[str, Any]:
    readiness = {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ready", "draining"]},
            "in_flight": {"type": "integer", "minimum": 0},
            "capacity": {"type": "integer", "minimum": 1},
        },
        "required": ["status", "in_flight", "capacity"],
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "optimizer",
            "version": __version__,
            "description": "Upload an image; get it back resized (Lanczos, aspect ratio kept) and freshly "
            "re-encoded for the web. Every error is application/problem+json with a stable `code`.",
        },
        "servers": [{"url": base_path or "/"}],
        "paths": {
            "/optimize": {
                "post": _image_operation(
                    "Resize and re-encode an image",
                    "The body is multipart/form-data with a file part named `image`, or the raw image "
                    "bytes. With neither width nor height the size is kept (capped at "
                    f"{settings.max_dimension} px).",
                    settings,
                    upload=False,
                )
            },
            "/upload": {
                "post": _image_operation(
                    "The Go service's contract: a 300 px wide JPEG at quality 80",
                    "The same as /optimize with the defaults width=300, format=jpeg, quality=80, enlarge=1.",
                    settings,
                    upload=True,
                )
            },
            "/healthz": {
                "get": _json_get(
                    "alive",
                    {"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]},
                )
            },
            "/readyz": {
                "get": _json_get(
                    "ready to accept work",
                    readiness,
                    {
                        "503": {
                            "description": "shutting down",
                            "content": {"application/json": {"schema": readiness}},
                        }
                    },
                )
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics of this instance",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": _json_get("this document", {"type": "object"}),
            },
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": {
                "Problem": {
                    "type": "object",
                    "description": "RFC 9457 problem details with a stable machine-readable code.",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "code": {"type": "string"},
                    },
                    "required": ["type", "title", "status", "detail", "code"],
                }
            },
        },
    }
