"""Users and API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from crosspatch.app.schemas.common import Text

UserName = str


class UserCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "ada", "role": "researcher"}]}
    )

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    role: Literal["admin", "researcher"] = "researcher"


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: str
    active: bool
    created_at: datetime


class UsersPublic(BaseModel):
    data: list[UserPublic]
    count: int


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: Text = Field(default="", max_length=64)


class KeyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    prefix: str
    label: str
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    """The new key in full: shown this once, stored only as a hash."""

    key: str


class KeysPublic(BaseModel):
    data: list[KeyPublic]
    count: int
