"""Query and path parameters shared by several routers, bounded so no value reaches the database
out of its column's range (SQLite and PostgreSQL refuse integers past 64 / 32 bits with a 500)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from crosspatch.app.schemas.common import Text

INT32_MAX = 2**31 - 1

Offset = Annotated[int, Query(ge=0, le=INT32_MAX, description="Rows to skip (for paging).")]
KeyId = Annotated[int, Path(ge=1, le=INT32_MAX, description="The key's id (from the key listing).")]
UserNameParam = Annotated[
    str,
    Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="A user's name."),
]
FamilyFilter = Annotated[Text | None, Query(max_length=32, description="Only this family (e.g. llama).")]
