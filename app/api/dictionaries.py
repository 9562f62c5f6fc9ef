"""Dictionaries: list, show, register a local path."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from crosspatch.app.api.params import FamilyFilter, Offset
from crosspatch.app.deps import CurrentUser, ReadSessionDep, SessionDep, SettingsDep
from crosspatch.app.schemas.dictionaries import DictionariesPublic, DictionaryCreate, DictionaryPublic
from crosspatch.app.schemas.jobs import Name
from crosspatch.app.services import catalog

router = APIRouter(prefix="/dictionaries", tags=["dictionaries"])


@router.get("", response_model=DictionariesPublic)
def list_dictionaries(
    session: ReadSessionDep,
    _user: CurrentUser,
    family: FamilyFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> DictionariesPublic:
    """Dictionaries, newest first."""
    rows = catalog.list_dictionaries(session, family, limit, offset)
    return DictionariesPublic(data=[DictionaryPublic.model_validate(d) for d in rows], count=len(rows))


@router.get("/{dictionary_id}", response_model=DictionaryPublic)
def get_dictionary(dictionary_id: Name, session: ReadSessionDep, _user: CurrentUser) -> DictionaryPublic:
    """One dictionary with its metrics and gate status."""
    return DictionaryPublic.model_validate(catalog.get_dictionary(session, dictionary_id))


@router.post("", status_code=201, response_model=DictionaryPublic)
def register_dictionary(
    body: DictionaryCreate, session: SessionDep, settings: SettingsDep, user: CurrentUser
) -> DictionaryPublic:
    """Register a dictionary saved under one of the server's dictionary roots."""
    return DictionaryPublic.model_validate(catalog.register(session, settings, user, body))
