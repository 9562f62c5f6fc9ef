"""Features: top mediating features by family, one feature across events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from app.deps import CurrentUser, ResultsDep
from app.schemas.jobs import Name
from app.schemas.results import Rows
from app.services import results as service

router = APIRouter(prefix="/features", tags=["features"])


@router.get("/top", response_model=Rows)
def top_features(
    results: ResultsDep,
    _user: CurrentUser,
    family: Annotated[str | None, Query(max_length=32)] = None,
    dictionary_id: Annotated[Name | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> Rows:
    """Single features with the largest |effect| across all jobs, optionally for one family."""
    return service.top_features(results, family, dictionary_id, limit)


@router.get("/{dictionary_id}/{latent}", response_model=Rows)
def feature_across_events(
    dictionary_id: Name,
    latent: Annotated[int, Path(ge=0, le=1 << 24)],
    results: ResultsDep,
    _user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Rows:
    """One feature's activations and attributions across divergence events."""
    return service.feature(results, dictionary_id, latent, limit)
