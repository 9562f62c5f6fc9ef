"""The API router: includes every resource's router, nothing else."""

from __future__ import annotations

from fastapi import APIRouter

from crosspatch.app.api import admin, cache, dictionaries, features, figures, health, jobs, pairs, results
from crosspatch.app.schemas.common import ERROR_RESPONSES

api_router = APIRouter(responses=ERROR_RESPONSES)
api_router.include_router(health.router)
api_router.include_router(admin.router)
api_router.include_router(jobs.router)
api_router.include_router(results.router)
api_router.include_router(figures.router)
api_router.include_router(features.router)
api_router.include_router(dictionaries.router)
api_router.include_router(pairs.router)
api_router.include_router(cache.router)
