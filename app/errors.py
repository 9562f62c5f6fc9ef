"""Errors the service answers with: each becomes JSON `{"message", "code", "errors"?}` with a status."""

from __future__ import annotations

from typing import Any

from crosspatch.engine.errors import CrosspatchError


class AppError(CrosspatchError):
    """A request the service refuses; `status` is the HTTP status code."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors


class Unauthorized(AppError):
    status, code = 401, "unauthorized"


class Forbidden(AppError):
    status, code = 403, "forbidden"


class NotFound(AppError):
    status, code = 404, "not_found"


class Conflict(AppError):
    status, code = 409, "conflict"


class PayloadTooLarge(AppError):
    status, code = 413, "payload_too_large"


class Invalid(AppError):
    """A well-formed request whose values are wrong: names the field and the reason."""

    status, code = 422, "invalid"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}", errors=[{"field": field, "reason": reason}])


class QuotaExceeded(AppError):
    status, code = 429, "quota_exceeded"
