"""Dashboard pages without a browser (ASGI test client): login cookie, CSRF, roles, generated forms.

The browser tests (`test_dashboard.py`) need Chromium; these run everywhere and cost about a second.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from crosspatch.app.config import Settings
from crosspatch.app.main import create_app
from crosspatch.app.schemas.jobs import JobCreate
from crosspatch.app.services.users import bootstrap_users
from crosspatch.app.store.models import Job, User
from crosspatch.app.store.session import Store
from crosspatch.app.web import forms
from tests.app.builders import make_job


@pytest.fixture
def web(settings: Settings) -> Iterator[dict[str, Any]]:
    keys = bootstrap_users(settings, {"root": "admin", "ada": "researcher", "bob": "researcher"})
    store = Store.from_settings(settings)
    with store.session() as s:
        ids = {u.name: u.id for u in s.query(User)}
    jobs = {
        "ada": make_job(store, ids["ada"]),
        "bob_private": make_job(store, ids["bob"], share="owner"),
    }
    with TestClient(create_app(settings, embedded_worker=False), follow_redirects=False) as c:
        yield {"client": c, "keys": keys, "jobs": jobs, "store": store}
    store.dispose()


def _login(c: TestClient, key: str) -> str:
    """Log in through the form; returns the session's CSRF token from the queue page."""
    page = c.get("/ui/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    r = c.post("/ui/login", data={"csrf_token": token, "api_key": key, "next": "/ui/queue"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/queue"
    cookie = r.headers["set-cookie"]
    assert "crosspatch_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    queue = c.get("/ui/queue")
    assert queue.status_code == 200 and "default-src 'self'" in queue.headers["content-security-policy"]
    return re.search(r'name="csrf_token" value="([^"]+)"', queue.text).group(1)  # type: ignore[union-attr]


def _status(store: Store, job_id: uuid.UUID) -> str:
    with store.session() as s:
        return s.get(Job, job_id).status  # type: ignore[union-attr]


def test_login_csrf_and_roles(web: dict[str, Any]) -> None:
    c, jobs, store = web["client"], web["jobs"], web["store"]
    r = c.get("/ui/jobs/" + str(jobs["ada"]))
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=/ui/jobs/")
    assert c.post("/ui/login", data={"api_key": web["keys"]["ada"]}).status_code == 403  # no login token
    page = c.get("/ui/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    bad = c.post("/ui/login", data={"csrf_token": token, "api_key": "cpk_nope"})
    assert bad.status_code == 401 and "invalid or revoked API key" in bad.text
    csrf = _login(c, web["keys"]["ada"])

    assert c.get(f"/ui/jobs/{jobs['bob_private']}").status_code == 403  # the API's share rule
    assert c.get("/ui/users").status_code == 403  # admins only
    other = c.post(f"/ui/jobs/{jobs['bob_private']}/cancel", data={"csrf_token": csrf})
    assert other.status_code == 403 and _status(store, jobs["bob_private"]) == "queued"
    forged = c.post(f"/ui/jobs/{jobs['ada']}/cancel", data={"next": "/ui/queue"})
    assert forged.status_code == 403 and "CSRF token is missing" in forged.text
    assert c.post(f"/ui/jobs/{jobs['ada']}/cancel", data={"csrf_token": "x" * 64}).status_code == 403
    assert _status(store, jobs["ada"]) == "queued"
    ok = c.post(f"/ui/jobs/{jobs['ada']}/cancel", data={"csrf_token": csrf, "next": "/ui/queue"})
    assert ok.status_code == 303 and _status(store, jobs["ada"]) == "cancelled"
    bad_spec = c.post("/ui/submit/divergence", data={"csrf_token": csrf, "pair_id": "nope", "prompts": "[]"})
    assert bad_spec.status_code == 422 and "prompts" in bad_spec.text  # the schema's message, re-shown

    assert c.post("/ui/logout", data={}).status_code == 403  # logout is a form too
    assert c.post("/ui/logout", data={"csrf_token": csrf}).status_code == 303
    c.cookies.clear()
    assert c.get("/ui/queue").status_code == 303

    _login(c, web["keys"]["root"])
    assert c.get(f"/ui/jobs/{jobs['bob_private']}").status_code == 200
    assert ">bob</th>" in c.get("/ui/users").text


def test_every_kinds_form_prefilled_from_its_example_submits_that_example() -> None:
    """Reading back each generated form (example values) gives the example's own JobCreate."""
    for kind in forms.spec_models():
        fields = forms.form_fields(kind)
        posted = {f.name: f.value for f in fields if f.widget != "checkbox" or f.value}
        got = forms.parse_form(kind, {**posted, "share": "lab", "priority": "0"})
        want = JobCreate.model_validate({"spec": {"kind": kind, **forms.example_spec(kind)}})
        assert got.spec == want.spec, kind
