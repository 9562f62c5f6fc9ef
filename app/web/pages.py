"""The lab dashboard: HTML pages served by the API process itself (`/ui/...`).

Every number comes from the same `app/services` functions the JSON API calls, and every permission from
the API's own dependencies (`deps.get_job`, `deps.get_owned_job`, `deps.get_admin`), read through a
session cookie instead of an `Authorization` header. Routes stay thin: gather through services, render.
"""

from __future__ import annotations

import hmac
import math
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from crosspatch.app import auth, deps
from crosspatch.app.api import jobs as jobs_api
from crosspatch.app.deps import ReadSessionDep, ResultsDep, SessionDep, SettingsDep, StoreDep
from crosspatch.app.errors import AppError, Conflict, Forbidden, NotFound
from crosspatch.app.schemas.jobs import JobPublic, Name
from crosspatch.app.services import features as features_service
from crosspatch.app.services import jobs as jobs_service
from crosspatch.app.services import results as results_service
from crosspatch.app.services import users as users_service
from crosspatch.app.store.models import ACTIVE_STATUSES, Job
from crosspatch.app.store.result_tables import TABLES
from crosspatch.app.web import forms, svg
from crosspatch.app.web.session import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    AdminViewer,
    FormDep,
    ViewerDep,
    WebJob,
    WebRoute,
    check_csrf,
    clear_session,
    new_login_token,
    on_error,
    set_session,
)

HERE = Path(__file__).parent
STATIC_FILES = {"style.css": "text/css", "dashboard.js": "text/javascript"}
PAGE_SIZE = 25
CELLS = ("y_ptup_ptlate", "y_ptup_itlate", "y_itup_ptlate", "y_itup_itlate", "interaction")
CONTROL_TABLES = ("offmanifold", "commitment", "baselines", "lineage", "recipe_contrasts", "lora_controls")
FORCED_TABLES = ("forced_summaries", "continuation_summaries")
TABLE_ROWS = 50  # rows of a secondary table shown inline (the rest: the Parquet download)
# Content-Security-Policy: nothing from outside this server, no inline script.
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'"

router = APIRouter(route_class=WebRoute, include_in_schema=False)
templates = Jinja2Templates(directory=str(HERE / "templates"))


def compact(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A table's columns that vary, and those constant over all its rows (printed once, above it)."""
    if len(rows) < 2:
        return {"columns": list(rows[0]) if rows else [], "constant": {}}
    constant = {c: rows[0][c] for c in rows[0] if all(r[c] == rows[0][c] for r in rows)}
    return {"columns": [c for c in rows[0] if c not in constant], "constant": constant}


templates.env.globals.update(fmt=svg.fmt, csrf_field=CSRF_FIELD, compact=compact)


def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    """A page with the security headers every dashboard page carries."""
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


@on_error
def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return render(request, "error.html", {"status": status, "message": message, "viewer": None}, status)


def pages(count: int, page: int, size: int = PAGE_SIZE) -> dict[str, int]:
    """Pagination numbers for a template: page (1-based), last page, offset."""
    last = max(1, math.ceil(count / size))
    page = min(max(1, page), last)
    return {"page": page, "last": last, "offset": (page - 1) * size, "size": size, "count": count}


Page = Annotated[int, Query(ge=1, le=1_000_000)]


# ---- login -------------------------------------------------------------------------------------------


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/static/{name}")
def static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise NotFound(f"no static file {name!r}")
    return FileResponse(HERE / "static" / name, media_type=STATIC_FILES[name])


def _safe_next(target: str | None) -> str:
    """Only a path on this dashboard (never another site) after login."""
    if target and target.startswith("/ui/") and not target.startswith("//"):
        return target
    return "/ui/queue"


@router.get("/ui/login")
def login_form(request: Request, next: str | None = None, error: str | None = None) -> HTMLResponse:
    token = new_login_token()
    response = render(
        request, "login.html", {"viewer": None, "token": token, "next": _safe_next(next), "error": error}
    )
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", path="/ui/login")
    return response


@router.post("/ui/login")
def login(request: Request, form: FormDep, session: ReadSessionDep) -> Response:
    """Check the key like the API does; keep it in the session cookie."""
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(form.get(CSRF_FIELD, ""), expected):
        raise Forbidden("the login form's token is missing or stale; reload the login page")
    key = form.get("api_key", "").strip()
    user = auth.authenticate(session, key) if key else None
    if user is None:
        token = new_login_token()
        context = {
            "viewer": None,
            "token": token,
            "next": _safe_next(form.get("next")),
            "error": "invalid or revoked API key",
        }
        response = render(request, "login.html", context, status=401)
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", path="/ui/login")
        return response
    response = RedirectResponse(_safe_next(form.get("next")), status_code=303)
    set_session(response, request, key)
    response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
    return response


@router.post("/ui/logout")
def logout(viewer: ViewerDep, form: FormDep) -> RedirectResponse:
    check_csrf(viewer, form)
    response = RedirectResponse("/ui/login", status_code=303)
    clear_session(response)
    return response


# ---- queue -------------------------------------------------------------------------------------------


def _eta(job: JobPublic, now: datetime) -> str:
    """Remaining time at the job's average pace so far (running jobs with some progress)."""
    fraction = float((job.progress or {}).get("fraction") or 0.0)
    if job.status != "running" or job.started_at is None or not 0 < fraction < 1:
        return ""
    started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=UTC)
    seconds = (now - started).total_seconds() * (1 - fraction) / fraction
    return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"


def _device(worker_id: str | None) -> str:
    """The device in a worker id `host:pid:device:nonce`."""
    parts = (worker_id or "").split(":")
    return parts[2] if len(parts) >= 4 else ""


def _may_read(job: JobPublic, viewer: Any) -> bool:
    return job.share == "lab" or job.owner == viewer.user.name or viewer.is_admin


def _may_change(job: JobPublic, viewer: Any) -> bool:
    return job.owner == viewer.user.name or viewer.is_admin


@router.get("/ui/")
@router.get("/ui/queue")
def queue(
    request: Request,
    viewer: ViewerDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    page: Page = 1,
    mine: bool = False,
) -> HTMLResponse:
    """Who runs what: every job, newest first (others' specs redacted as in the API)."""
    offset = (page - 1) * PAGE_SIZE
    data, count = jobs_service.list_jobs(
        session, viewer.user, settings, mine=mine, status=None, limit=PAGE_SIZE, offset=offset
    )
    nav = pages(count, page)
    now = datetime.now(UTC)
    rows = [
        {
            "job": j,
            "fraction": float((j.progress or {}).get("fraction") or 0.0),
            "message": (j.progress or {}).get("message") or "",
            "eta": _eta(j, now),
            "device": _device(j.worker_id),
            "readable": _may_read(j, viewer),
            "cancellable": _may_change(j, viewer) and j.status in ACTIVE_STATUSES,
            "live": j.status in ACTIVE_STATUSES and _may_read(j, viewer),
        }
        for j in data
    ]
    # live progress: one SSE stream per active row, within the server's per-user stream limit
    budget = max(0, settings.max_streams_per_user - 1)
    for r in rows:
        r["live"], budget = r["live"] and budget > 0, budget - (r["live"] and budget > 0)
    return render(request, "queue.html", {"viewer": viewer, "rows": rows, "nav": nav, "mine": mine})


@router.post("/ui/jobs/{job_id}/cancel")
def cancel(job_id: uuid.UUID, viewer: ViewerDep, form: FormDep, session: SessionDep) -> RedirectResponse:
    """Cancel (owner or admin: the API's `OwnedJob` rule) after the CSRF check."""
    check_csrf(viewer, form)
    job = deps.get_owned_job(deps.get_job(job_id, session, viewer.user), viewer.user)
    jobs_service.cancel(session, job.id, viewer.user)
    return RedirectResponse(_safe_next(form.get("next")), status_code=303)


@router.get("/ui/jobs/{job_id}/progress")
async def progress(
    job: WebJob, request: Request, store: StoreDep, viewer: ViewerDep, settings: SettingsDep
) -> Response:
    """The API's own progress stream (SSE), for a page holding a session cookie."""
    return await jobs_api.job_progress(job, request, store, viewer.user, settings)


# ---- job report --------------------------------------------------------------------------------------


def _interval(r: dict[str, Any], label: str) -> svg.Interval:
    return svg.Interval(label, r.get("estimate"), r.get("ci_low"), r.get("ci_high"), r.get("family") or "")


def _two_by_two(summaries: list[dict[str, Any]], readout: str) -> list[dict[str, Any]]:
    """Headline 2x2 rows (pair, family and family-balanced levels): each cell and the interaction with CI."""
    keyed: dict[tuple, dict[str, Any]] = {}
    for r in summaries:
        if r["statistic"] not in CELLS or r["readout"] != readout or r["subset"] != "all":
            continue
        if not r.get("headline"):  # each pair at its headline boundary (not the depth-matched rows)
            continue
        key = (r["level"], r["family"] or "", r["pair_id"] or "", r["boundary"])
        row = keyed.setdefault(
            key,
            {"level": r["level"], "family": r["family"], "pair_id": r["pair_id"], "boundary": r["boundary"]},
        )
        row[r["statistic"]] = r
    order = {"pair": 0, "family": 1, "balanced": 2}
    return sorted(
        keyed.values(), key=lambda x: (order.get(x["level"], 3), x["family"] or "", x["pair_id"] or "")
    )


def _label(row: dict[str, Any]) -> str:
    if row["level"] == "pair":
        return f"{row['pair_id']} (b={row['boundary']})"
    if row["level"] == "family":
        return f"{row['family']} (family)"
    return "family-balanced"


def _sweep(summaries: list[dict[str, Any]], readout: str) -> dict[str, list[tuple]]:
    """Per pair: the interaction at each boundary of the sweep, with CI."""
    series: dict[str, list[tuple]] = {}
    for r in summaries:
        if (
            r["level"] == "pair"
            and r["statistic"] == "interaction"
            and r["readout"] == readout
            and r["subset"] == "all"
        ):
            series.setdefault(r["pair_id"], []).append(
                (r["boundary"], r["estimate"], r["ci_low"], r["ci_high"])
            )
    return series if any(len(v) > 1 for v in series.values()) else {}


def _rows(results: Any, job: Job, table: str, limit: int = TABLE_ROWS) -> list[dict[str, Any]]:
    return results_service.table_rows(results, job, table, limit=limit, offset=0).data


@router.get("/ui/jobs/{job_id}")
def job_report(
    request: Request,
    job: WebJob,
    viewer: ViewerDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    results: ResultsDep,
    readout: Annotated[str | None, Query(pattern="^(it|pt|own)$")] = None,
) -> HTMLResponse:
    """One job: its spec, provenance, the 2x2 with CIs, the sweep, controls, mediation, forced tokens."""
    public = jobs_service.to_public(session, job, viewer.user, settings)
    private = jobs_service.may_see_private(job, viewer.user, settings)
    context: dict[str, Any] = {
        "viewer": viewer,
        "job": public,
        "private": private,
        "cancellable": _may_change(public, viewer) and job.status in ACTIVE_STATUSES,
        "live": job.status in ACTIVE_STATUSES,
        "fraction": float((public.progress or {}).get("fraction") or 0.0),
    }
    if job.status == "succeeded":
        summaries = _rows(results, job, "summaries", limit=1_000_000)
        readouts = sorted({r["readout"] for r in summaries})
        readout = readout if readout in readouts else ("it" if "it" in readouts else (readouts or ["it"])[0])
        grid = _two_by_two(summaries, readout)
        counts = {
            t: n for t, n in results.counts(str(job.id)).items() if n and t in TABLES and t != "provenance"
        }
        effects = (
            _rows(results, job, "feature_effects", limit=100_000) if counts.get("feature_effects") else []
        )
        prov = None
        if private:
            try:
                prov = results_service.provenance(results, job).provenance
            except NotFound:
                prov = None
        context.update(
            readout=readout,
            readouts=readouts,
            grid=grid,
            forest=svg.forest(
                [_interval(r["interaction"], _label(r)) for r in grid if "interaction" in r],
                f"Interaction (readout {readout}) with 95% CIs",
                "interaction = Y(IT up, IT late) - Y(IT up, PT late) - Y(PT up, IT late) + Y(PT up, PT late)",
            ),
            sweep=svg.curves(
                _sweep(summaries, readout), "Interaction across the boundary sweep", "boundary", "interaction"
            ),
            label=_label,
            cells=CELLS,
            controls={t: _rows(results, job, t) for t in CONTROL_TABLES if counts.get(t)},
            forced={t: _rows(results, job, t) for t in FORCED_TABLES if counts.get(t)},
            set_effects=[r for r in effects if r["latent"] is None],
            top_latents=sorted(
                (r for r in effects if r["latent"] is not None and r["intervention"] == "attribution"),
                key=lambda r: -(r["effect"] or 0.0),
            )[:10],
            gate=_rows(results, job, "gate_checks") if counts.get("gate_checks") else [],
            counts=counts,
            provenance=prov,
        )
    return render(request, "job.html", context)


@router.get("/ui/jobs/{job_id}/download/{table}")
def download(job: WebJob, table: str, results: ResultsDep) -> Response:
    """A result table as Parquet (the API's download, with the column descriptions)."""
    if table not in TABLES or table == "provenance":
        raise NotFound(f"no results table {table!r}")
    data = results_service.table_parquet(results, job, table, limit=10_000_000, offset=0)
    headers = {"Content-Disposition": f'attachment; filename="{job.id}-{table}.parquet"'}
    return Response(data, media_type="application/vnd.apache.parquet", headers=headers)


# ---- families, features ------------------------------------------------------------------------------


@router.get("/ui/families")
def families(
    request: Request,
    viewer: ViewerDep,
    results: ResultsDep,
    readout: Annotated[str, Query(pattern="^(it|pt|own)$")] = "it",
    category: Annotated[str, Query(max_length=64)] = "",
    position: Annotated[str, Query(pattern=r"^\d{0,6}$", description="Position at least (blank: any).")] = "",
    near_tie: Annotated[bool, Query(description="Leave out near-tie events.")] = False,
    boundary: Annotated[str, Query(pattern=r"^\d{0,4}$", description="Blank: each pair's headline.")] = "",
    page: Page = 1,
) -> HTMLResponse:
    """The interaction with CI per pair, grouped by family, for one prompt subset (the API's
    `compare_families`, with its subset: a category, a position minimum, or no near ties)."""
    position_min = int(position) if position else None  # blank form fields mean "any"
    boundary_at = int(boundary) if boundary else None
    if category:
        subset = f"category={category}"
    elif position_min is not None:
        subset = f"position>={position_min}"
    else:
        subset = "no_near_tie" if near_tie else "all"
    rows = results_service.compare_families(results, readout, boundary=boundary_at, subset=subset).data
    by_pair: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        entry = by_pair.setdefault((r["family"], r["pair_id"], r["boundary"]), {**r, "shares": {}})
        if r.get("k") is not None:
            entry["shares"][r["k"]] = r["topk_share"]
    entries = list(by_pair.values())
    ks = sorted({k for e in entries for k in e["shares"]})
    nav = pages(len(entries), page)
    shown = entries[nav["offset"] : nav["offset"] + nav["size"]]
    chart = svg.forest(
        [
            svg.Interval(
                f"{e['family']} / {e['pair_id']} (b={e['boundary']})",
                e["interaction"],
                e["ci_low"],
                e["ci_high"],
                e["family"],
            )
            for e in shown
        ],
        f"Interaction per pair, by family (subset {subset}, readout {readout})",
        "interaction",
    )
    context = {
        "viewer": viewer,
        "entries": shown,
        "ks": ks,
        "chart": chart,
        "nav": nav,
        "subset": subset,
        "q": {
            "readout": readout,
            "category": category,
            "position": position,
            "near_tie": near_tie,
            "boundary": boundary,
        },
    }
    return render(request, "families.html", context)


@router.get("/ui/features")
def features(
    request: Request,
    viewer: ViewerDep,
    results: ResultsDep,
    family: Annotated[str | None, Query(max_length=64)] = None,
    include_failed_gate: bool = True,
) -> HTMLResponse:
    """Top mediating features (the API's `top_features`), each linking to its feature page."""
    rows = results_service.top_features(
        results,
        family=family or None,
        dictionary_id=None,
        layer=None,
        min_events=0,
        intervention="attribution",
        limit=100,
        include_failed_gate=include_failed_gate,
    ).data
    return render(
        request,
        "features.html",
        {"viewer": viewer, "rows": rows, "family": family or "", "include_failed_gate": include_failed_gate},
    )


@router.get("/ui/features/{dictionary_id}/{latent}")
def feature(
    request: Request,
    viewer: ViewerDep,
    results: ResultsDep,
    dictionary_id: Name,
    latent: Annotated[int, PathParam(ge=0, le=1 << 24)],
    page: Page = 1,
) -> HTMLResponse:
    """One latent's page: what it fires on, what ablating it does, whether its dictionary passed its gate."""
    fp = features_service.feature_page(results, dictionary_id, latent)
    nav = pages(len(fp.examples), page, size=20)
    chart = svg.histogram(
        [(b.lo, b.hi, b.count) for b in fp.histogram], "Activation histogram (IT up)", "activation"
    )
    context = {
        "viewer": viewer,
        "fp": fp,
        "nav": nav,
        "examples": fp.examples[nav["offset"] : nav["offset"] + nav["size"]],
        "chart": chart,
    }
    return render(request, "feature.html", context)


# ---- submit, users -----------------------------------------------------------------------------------


@router.get("/ui/submit")
def submit_index(request: Request, viewer: ViewerDep) -> HTMLResponse:
    models = forms.spec_models()
    kinds = [(k, (m.__doc__ or "").strip().splitlines()[0]) for k, m in sorted(models.items())]
    return render(request, "submit_index.html", {"viewer": viewer, "kinds": kinds})


@router.get("/ui/submit/{kind}")
def submit_form(request: Request, viewer: ViewerDep, kind: str) -> HTMLResponse:
    if kind not in forms.spec_models():
        raise NotFound(f"no job kind {kind!r}")
    context = {
        "viewer": viewer,
        "kind": kind,
        "fields": forms.form_fields(kind),
        "error": None,
        "priority": "0",
        "share": "lab",
    }
    return render(request, "submit.html", context)


@router.post("/ui/submit/{kind}")
def submit(
    request: Request, viewer: ViewerDep, form: FormDep, session: SessionDep, settings: SettingsDep, kind: str
) -> Response:
    """Validate the form as a `JobCreate` and submit it through the API's submit service."""
    check_csrf(viewer, form)
    try:
        body = forms.parse_form(kind, form)
        job = jobs_service.submit(session, settings, viewer.user, body)
    except AppError as e:
        if isinstance(e, Forbidden | Conflict) or kind not in forms.spec_models():
            raise
        context = {
            "viewer": viewer,
            "kind": kind,
            "fields": forms.form_fields(kind, values=form),
            "error": e.message,
            "priority": form.get("priority", "0"),
            "share": form.get("share", "lab"),
        }
        return render(request, "submit.html", context, status=e.status)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


@router.get("/ui/users")
def users(request: Request, viewer: AdminViewer, session: ReadSessionDep) -> HTMLResponse:
    """Every user with their role (admins only, like `GET /admin/users`)."""
    return render(request, "users.html", {"viewer": viewer, "users": users_service.list_users(session)})
