"""The service's error tree.

Every failure a client can cause is one of these classes. Each carries the HTTP status, a stable
machine-readable ``code`` and a public ``detail`` that never contains paths, tracebacks or library
internals; ``optimizer.app`` turns them into RFC 9457 ``application/problem+json`` bodies.

    OptimizerError
     ├── BadRequest                400  bad_request
     │    ├── InvalidParameter     400  invalid_parameter
     │    ├── EmptyBody            400  empty_body
     │    ├── MissingImage         400  missing_image
     │    └── MalformedUpload      400  malformed_upload
     ├── Unauthorized              401  unauthorized        (WWW-Authenticate)
     ├── BadSignature              403  bad_signature
     ├── OriginNotAllowed          403  origin_not_allowed
     ├── UploadStalled             408  upload_stalled
     ├── BodyTooLarge              413  body_too_large
     ├── TooManyPixels             413  too_many_pixels
     ├── OverMemoryBudget          413  over_memory_budget
     ├── UnsupportedFormat         415  unsupported_format
     ├── CorruptImage              422  corrupt_image
     ├── Overloaded                503  overloaded          (Retry-After)
     ├── Draining                  503  draining            (Connection: close)
     └── ShutdownDeadline          503  shutdown_deadline   (Connection: close)

This module is stdlib-only so that the pipeline, which knows nothing of HTTP, can raise these too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class StructureLimit(Exception):
    """A file's structure is past a limit of the walks that run before Pillow parses it (segments,
    chunks, blocks, boxes, directory values): ``optimizer.pipeline`` answers it as ``CorruptImage``."""


class OptimizerError(Exception):
    """Base class: a failure with a status, a stable code and a message safe to show a client."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal Server Error"

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(OptimizerError):
    status = 400
    code = "bad_request"
    title = "Bad Request"


class InvalidParameter(BadRequest):
    code = "invalid_parameter"
    title = "Invalid parameter"

    def __init__(self, parameter: str, detail: str) -> None:
        super().__init__(f"{parameter}: {detail}")
        self.parameter = parameter


class EmptyBody(BadRequest):
    code = "empty_body"
    title = "Empty upload"


class MissingImage(BadRequest):
    code = "missing_image"
    title = "No image part"


class MalformedUpload(BadRequest):
    code = "malformed_upload"
    title = "Malformed upload"


class Unauthorized(OptimizerError):
    status = 401
    code = "unauthorized"
    title = "API key missing or not accepted"

    def __init__(self, detail: str, *, header: str = "X-API-Key") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": f'ApiKey header="{header}"'})


class BadSignature(OptimizerError):
    status = 403
    code = "bad_signature"
    title = "Signature missing, invalid or expired"


class OriginNotAllowed(OptimizerError):
    status = 403
    code = "origin_not_allowed"
    title = "Cross-origin request not allowed"


class UploadStalled(OptimizerError):
    status = 408
    code = "upload_stalled"
    title = "Upload too slow"


class BodyTooLarge(OptimizerError):
    status = 413
    code = "body_too_large"
    title = "Upload too large"


class TooManyPixels(OptimizerError):
    status = 413
    code = "too_many_pixels"
    title = "Image has too many pixels"


class OverMemoryBudget(OptimizerError):
    status = 413
    code = "over_memory_budget"
    title = "Image needs more memory than the service may use"


class UnsupportedFormat(OptimizerError):
    status = 415
    code = "unsupported_format"
    title = "Unsupported image format"


class CorruptImage(OptimizerError):
    status = 422
    code = "corrupt_image"
    title = "Image cannot be decoded"


# The longest Retry-After any 503 tells: past a minute a client is better off asking again (or asking
# another instance) than trusting an estimate, and a configured wait of hours must not be passed on.
MAX_RETRY_AFTER = 60


class Overloaded(OptimizerError):
    status = 503
    code = "overloaded"
    title = "Service overloaded"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        """``retry_after`` is clamped to 1..``MAX_RETRY_AFTER`` whole seconds."""
        retry_after = max(1, min(MAX_RETRY_AFTER, retry_after))
        super().__init__(detail, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class Draining(OptimizerError):
    status = 503
    code = "draining"
    title = "Service shutting down"

    def __init__(self, detail: str = "the service is shutting down; retry on another instance") -> None:
        super().__init__(detail, headers={"Connection": "close", "Retry-After": "1"})


class ShutdownDeadline(OptimizerError):
    """Admitted, but the drain deadline passed before the image was finished."""

    status = 503
    code = "shutdown_deadline"
    title = "Shut down before the image was finished"

    def __init__(self) -> None:
        super().__init__(
            "the service reached its shutdown deadline before this image was finished; retry",
            headers={"Connection": "close", "Retry-After": "1"},
        )
