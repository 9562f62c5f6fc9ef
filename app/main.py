"""create_app(): routers, error handlers, body-size limit, and the lifespan (migrate, stores,
housekeeping thread, optional embedded worker subprocess)."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crosspatch.app.api.main import api_router
from crosspatch.app.config import Settings, get_settings
from crosspatch.app.errors import AppError, PayloadTooLarge
from crosspatch.app.services.ingest import Housekeeper
from crosspatch.app.store.duckdb import ResultsError, ResultsStore
from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.session import Store
from crosspatch.app.web import router as web_router
from crosspatch.app.worker.supervisor import PARENT_PID_ENV, DeviceLock

log = logging.getLogger(__name__)
API_PREFIX = "/api/v1"


def _unique_id(route: APIRoute) -> str:
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def settings_env(settings: Settings) -> dict[str, str]:
    """`settings` as CROSSPATCH_* environment variables (for a worker subprocess)."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        env[f"CROSSPATCH_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


def start_worker_process(
    settings: Settings, device: str | None = None, lock: DeviceLock | None = None
) -> subprocess.Popen[bytes]:
    """A local, supervised `python -m crosspatch.app.worker` subprocess sharing this process's settings.

    It dies with this process (SIGTERM on parent death) and inherits `lock`, the device's lock, so the
    device stays taken while any of its processes lives.
    """
    env = {**os.environ, **settings_env(settings), PARENT_PID_ENV: str(os.getpid())}
    cmd = [sys.executable, "-m", "crosspatch.app.worker", "--device", device or settings.device]
    if lock is None:
        return subprocess.Popen(cmd, env=env)
    return subprocess.Popen([*cmd, "--lock-fd", str(lock.fd)], env=env, pass_fds=(lock.fd,))


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with a JSON 413 (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        seen, refused = 0, False

        async def limited() -> Message:
            # Past the limit: answer 413 here and tell the app the client left (an exception raised
            # here would reach the app's body parser, which turns any error into a 400).
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # the 413 is the whole answer; drop whatever the app says after it
                await send(message)

        await self.app(scope, limited, guarded_send)

    async def _refuse(self, send: Send) -> None:
        err = PayloadTooLarge(f"request body larger than {self.max_bytes} bytes")
        response = JSONResponse({"message": err.message, "code": err.code}, status_code=err.status)
        await response({"type": "http"}, _noop_receive, send)


async def _noop_receive() -> Message:
    return {"type": "http.disconnect"}


def _error(status: int, message: str, code: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "code": code}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status)


def _field(error: dict[str, Any]) -> str:
    """The field an error is about, dotted; a body that is not JSON at all is about `body` (its `loc`
    holds the character offset of the syntax error, which names no field)."""
    if error.get("type") == "json_invalid":
        return "body"
    parts = [str(p) for p in error.get("loc", ()) if p not in ("body",)]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as JSON with a message; no traceback ever does."""

    @app.exception_handler(AppError)
    async def app_error(_req: Request, exc: AppError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.code, exc.errors)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(dict(e)), "reason": str(e.get("msg", "invalid"))} for e in exc.errors()]
        message = "; ".join(f"{e['field']}: {e['reason']}" for e in errors[:5]) or "invalid request"
        return _error(422, message, "invalid", errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, str(exc.detail), code)

    @app.exception_handler(ResultsError)
    async def results_error(_req: Request, exc: ResultsError) -> JSONResponse:
        log.error("results store: %s", exc)
        return _error(503, "the results store failed; try again or ask the admin", "results_unavailable")

    @app.exception_handler(Exception)
    async def internal_error(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error(500, "internal server error", "internal")


def create_app(settings: Settings | None = None, *, embedded_worker: bool | None = None) -> FastAPI:
    """The crosspatch service. `embedded_worker` defaults to `settings.embedded_worker`."""
    settings = settings or get_settings()
    with_worker = settings.embedded_worker if embedded_worker is None else embedded_worker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        assert settings.database_url is not None and settings.duckdb_path is not None
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.database_url)
        app.state.settings = settings
        app.state.store = Store.from_settings(settings)
        app.state.results = ResultsStore(settings.duckdb_path)
        housekeeper = Housekeeper(settings, app.state.store, app.state.results)
        housekeeper.start()
        worker, lock = None, None
        if with_worker:  # refuses (DeviceBusy) while another server's worker on this device lives
            lock = DeviceLock.acquire(
                settings, settings.device, wait_seconds=2 * settings.cancel_grace_seconds
            )
            worker = start_worker_process(settings, lock=lock)
        # Everything imported and built so far lives as long as the process: move it out of the
        # collector's view, so a full collection under load scans only new objects (a full pass over
        # the startup heap is a pause of tens of ms that every request in flight waits out).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if worker is not None:
                worker.terminate()
                try:
                    worker.wait(timeout=settings.cancel_grace_seconds + 30)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
            if lock is not None:
                lock.release()
            housekeeper.stop()
            app.state.results.close()
            app.state.store.dispose()

    app = FastAPI(
        title="crosspatch",
        version="1",
        description="Submit cross-patching and mediation jobs on PT/IT pairs; query their results.",
        lifespan=lifespan,
        generate_unique_id_function=_unique_id,
    )
    install_error_handlers(app)
    app.include_router(api_router, prefix=API_PREFIX)
    app.include_router(web_router)  # the dashboard pages (/ui/)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    return app
