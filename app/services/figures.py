"""A job's figures as the API serves them (drawn at ingest by `app.services.plots`)."""

from __future__ import annotations

from pathlib import Path

from crosspatch.app.config import Settings
from crosspatch.app.errors import NotFound
from crosspatch.app.schemas.results import FigurePublic, FiguresPublic
from crosspatch.app.services.plots import list_figures
from crosspatch.app.store.layout import figures_dir
from crosspatch.app.store.models import Job

API_PREFIX = "/api/v1"


def list_public(settings: Settings, job: Job) -> FiguresPublic:
    data = [
        FigurePublic(name=p.stem, url=f"{API_PREFIX}/jobs/{job.id}/figures/{p.name}", bytes=p.stat().st_size)
        for p in list_figures(settings.data_dir, job.id)
    ]
    return FiguresPublic(data=data, count=len(data))


def figure_path(settings: Settings, job: Job, name: str) -> Path:
    """The file of figure `name` (a plain name: the route's pattern admits no path separators)."""
    path = figures_dir(settings.data_dir, job.id) / f"{name}.png"
    if not path.is_file():
        raise NotFound(f"job {job.id} has no figure {name!r}")
    return path
