"""Schemas shared by every resource: errors, health, version."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

from crosspatch.app.schemas.examples import ERROR_EXAMPLES


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


# Free text stored in a string column (PostgreSQL text refuses NUL characters with an error).
Text = Annotated[str, AfterValidator(_no_nul)]


class FieldError(BaseModel):
    field: str
    reason: str


class ErrorPublic(BaseModel):
    """Every error the API returns: a message for people, a code for programs, and for invalid input
    the fields with their reasons. Never a traceback."""

    model_config = ConfigDict(json_schema_extra={"examples": ERROR_EXAMPLES})

    message: str
    code: str
    errors: list[FieldError] | None = None


class Health(BaseModel):
    status: str
    database: str
    results: str
    queued: int
    running: int


class Version(BaseModel):
    crosspatch: str
    api: str
    job_kinds: list[str]
    extra: dict[str, Any] = {}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorPublic, "description": desc}
    for code, desc in {
        401: "missing or invalid API key",
        403: "not allowed for this user",
        404: "no such resource",
        409: "conflicting state",
        413: "request body too large",
        422: "invalid input (field and reason)",
        429: "quota exceeded",
    }.items()
}
