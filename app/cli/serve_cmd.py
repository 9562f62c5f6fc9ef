"""`crosspatch serve` (the HTTP service, optionally with one embedded worker) and `crosspatch worker`."""

from __future__ import annotations

from typing import Annotated

import typer

from crosspatch.app.cli import cli
from crosspatch.app.config import get_settings
from crosspatch.app.log import configure_logging


@cli.command("serve")
def serve(
    host: Annotated[
        str | None, typer.Option(help="Bind address (default CROSSPATCH_HOST, 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default CROSSPATCH_PORT, 8000).")] = None,
    worker: Annotated[
        bool | None,
        typer.Option("--worker/--no-worker", help="Start one local worker subprocess (embedded mode)."),
    ] = None,
) -> None:
    """Run the service: migrate the job store, own the DuckDB file, ingest results, answer the API."""
    import uvicorn

    from crosspatch.app.main import create_app

    settings = get_settings()
    configure_logging(settings.log_level)
    app = create_app(settings, embedded_worker=worker)
    uvicorn.run(
        app, host=host or settings.host, port=port or settings.port, log_level=settings.log_level.lower()
    )


@cli.command("worker")
def worker(
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda or cuda:N (default CROSSPATCH_DEVICE).")
    ] = None,
    max_jobs: Annotated[int | None, typer.Option(help="Exit after this many jobs.")] = None,
    exit_when_idle: Annotated[bool, typer.Option(help="Exit when the queue is empty.")] = False,
) -> None:
    """Run one worker on one device: claim jobs from the job store and run them (under a supervisor that
    replaces it when a job does not stop: see app/worker/supervisor.py)."""
    from crosspatch.app.worker.__main__ import _run_cli

    argv = ["--device", device or get_settings().device]
    argv += ["--max-jobs", str(max_jobs)] if max_jobs is not None else []
    argv += ["--exit-when-idle"] if exit_when_idle else []
    raise typer.Exit(_run_cli(argv))
