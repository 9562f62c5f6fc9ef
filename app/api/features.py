"""Features: top mediating features by family, one feature across events, ablation curves, family comparison."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query

from crosspatch.app.deps import CurrentUser, ResultsDep
from crosspatch.app.schemas.features import FeaturePage
from crosspatch.app.schemas.jobs import Name
from crosspatch.app.schemas.results import Rows
from crosspatch.app.services import features as pages
from crosspatch.app.services import results as service

router = APIRouter(prefix="/features", tags=["features"])
Family = Annotated[str | None, Query(max_length=64, description="Only this family (e.g. llama).")]


@dataclass
class FeatureRef:
    """One feature from the path (`/{dictionary_id}/{latent}`), optionally within one family."""

    dictionary_id: str
    latent: int
    family: str | None


def _feature_ref(
    dictionary_id: Name, latent: Annotated[int, Path(ge=0, le=1 << 24)], family: Family = None
) -> FeatureRef:
    return FeatureRef(dictionary_id, latent, family)


FeatureDep = Annotated[FeatureRef, Depends(_feature_ref)]


@router.get("/top", response_model=Rows)
def top_features(
    results: ResultsDep,
    _user: CurrentUser,
    family: Family = None,
    dictionary_id: Annotated[Name | None, Query()] = None,
    layer: Annotated[int | None, Query(ge=0, le=4096)] = None,
    min_events: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    intervention: Annotated[str, Query(max_length=64, pattern=r"^[a-z_]+$")] = "attribution",
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    include_failed_gate: Annotated[
        bool, Query(description="Also list features of dictionaries whose quality gate failed.")
    ] = False,
) -> Rows:
    """Top mediating features: fit-split attribution, held-out ablation drop with CI and n, gate status."""
    return service.top_features(
        results,
        family=family,
        dictionary_id=dictionary_id,
        layer=layer,
        min_events=min_events,
        intervention=intervention,
        limit=limit,
        include_failed_gate=include_failed_gate,
    )


@router.get("/upstream", response_model=Rows)
def feature_upstream(
    results: ResultsDep,
    _user: CurrentUser,
    family: Family = None,
    dictionary_id: Annotated[Name | None, Query()] = None,
    pair_id: Annotated[Name | None, Query(description="Only this pair.")] = None,
    split: Literal["test", "fit"] = "test",
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Rows:
    """Latents by how much IT upstream state drives them: mean activation IT-up vs PT-up, paired diff with CI."""
    return service.feature_upstream(
        results, family=family, dictionary_id=dictionary_id, pair_id=pair_id, split=split, limit=limit
    )


@router.get("/curve", response_model=Rows)
def ablation_curve(
    results: ResultsDep,
    _user: CurrentUser,
    family: Family = None,
    statistic: Literal[
        "share", "interaction_drop", "it_late_drop", "rescue_gain", "rescue_fraction"
    ] = "share",
) -> Rows:
    """Effect of ablating (or rescuing) the top-k features and their controls, as a curve over k."""
    return service.ablation_curve(results, family, statistic)


@router.get("/families", response_model=Rows)
def compare_families(
    results: ResultsDep,
    _user: CurrentUser,
    readout: Literal["it", "pt", "own"] = "it",
    boundary: Annotated[int | None, Query(ge=0, le=4096, description="Only this boundary.")] = None,
    pair_id: Annotated[Name | None, Query(description="Only this pair.")] = None,
) -> Rows:
    """Per family, pair and boundary: the 2x2 interaction with CI and the top-k ablation share at each k."""
    return service.compare_families(results, readout, boundary=boundary, pair_id=pair_id)


@router.get("/page/{dictionary_id}/{latent}", response_model=FeaturePage)
def feature_page(
    f: FeatureDep,
    results: ResultsDep,
    _user: CurrentUser,
    n_examples: Annotated[int, Query(ge=1, le=100)] = pages.N_EXAMPLES,
    labeller: Annotated[
        str | None, Query(max_length=64, description="A registered automatic labeller (none by default).")
    ] = None,
) -> FeaturePage:
    """One feature's page: top events in context, histogram, causal drop (CI), logit-lens tokens, gate."""
    return pages.feature_page(
        results, f.dictionary_id, f.latent, f.family, n_examples=n_examples, labeller=labeller
    )


@router.get("/{dictionary_id}/{latent}", response_model=Rows)
def feature_across_events(
    f: FeatureDep,
    results: ResultsDep,
    _user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Rows:
    """One feature's activations (PT-up, IT-up) and attributions across events, with the prompts' text."""
    return service.feature(results, f.dictionary_id, f.latent, f.family, limit)
