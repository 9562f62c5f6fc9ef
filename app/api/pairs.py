"""The allow-list of model pairs."""

from __future__ import annotations

from fastapi import APIRouter

from crosspatch.app.deps import AdminUser, CurrentUser, ReadSessionDep, SessionDep, SettingsDep
from crosspatch.app.schemas.pairs import PairCreate, PairPublic, PairsPublic
from crosspatch.app.services import pairs as service

router = APIRouter(prefix="/pairs", tags=["pairs"])


@router.get("", response_model=PairsPublic)
def list_pairs(session: ReadSessionDep, _user: CurrentUser) -> PairsPublic:
    """Pairs researchers may run, with their families and depths."""
    rows = service.list_pairs(session)
    return PairsPublic(data=[PairPublic.model_validate(p) for p in rows], count=len(rows))


@router.post("", status_code=201, response_model=PairPublic)
def add_pair(body: PairCreate, session: SessionDep, settings: SettingsDep, _admin: AdminUser) -> PairPublic:
    """Allow-list a pair (admin)."""
    return PairPublic.model_validate(service.add_pair(session, settings, **body.model_dump()))
