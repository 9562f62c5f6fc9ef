"""The OpenAPI document: every route is described, every job kind has a request example that validates."""

from __future__ import annotations

import pytest

from crosspatch.app.config import Settings
from crosspatch.app.main import create_app
from crosspatch.app.schemas.common import ErrorPublic
from crosspatch.app.schemas.examples import ERROR_EXAMPLES, JOB_CREATE_EXAMPLES, ROWS_EXAMPLE
from crosspatch.app.schemas.jobs import JobCreate, job_kinds
from crosspatch.app.schemas.results import Rows


@pytest.fixture(scope="module")
def openapi() -> dict:
    return create_app(Settings(_env_file=None)).openapi()  # type: ignore[call-arg]


def test_every_route_has_a_summary_and_a_description(openapi: dict) -> None:
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            assert op.get("summary") and op.get("description"), f"{method.upper()} {path}"


def test_job_examples_cover_every_kind_and_validate(openapi: dict) -> None:
    body = openapi["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert set(body["examples"]) == set(JOB_CREATE_EXAMPLES)
    seen = {JobCreate.model_validate(ex["value"]).spec.kind for ex in JOB_CREATE_EXAMPLES.values()}
    assert seen == set(job_kinds())  # every job kind of the spec union, e.g. forced_tokens, lineage


def test_response_examples_validate(openapi: dict) -> None:
    Rows.model_validate(ROWS_EXAMPLE)
    for example in ERROR_EXAMPLES:
        ErrorPublic.model_validate(example)
    schemas = openapi["components"]["schemas"]
    assert schemas["Rows"]["examples"] and schemas["ErrorPublic"]["examples"]
