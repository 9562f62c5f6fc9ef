"""Figures of a job: the PNGs drawn when its results were ingested."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import FileResponse

from crosspatch.app.deps import ReadableJob, SettingsDep
from crosspatch.app.schemas.results import FiguresPublic
from crosspatch.app.services import figures as service

router = APIRouter(prefix="/jobs/{job_id}/figures", tags=["figures"])
FigureName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z0-9_]+$")]


@router.get("", response_model=FiguresPublic)
def list_figures(job: ReadableJob, settings: SettingsDep) -> FiguresPublic:
    """The job's figures (none until it has succeeded; see `name` for what each shows)."""
    return service.list_public(settings, job)


@router.get(
    "/{name}.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG file."}},
)
def get_figure(job: ReadableJob, name: FigureName, settings: SettingsDep) -> FileResponse:
    """One figure as a PNG: family_2x2, interaction_by_boundary, top_features or ablation_curve."""
    return FileResponse(service.figure_path(settings, job, name), media_type="image/png")
