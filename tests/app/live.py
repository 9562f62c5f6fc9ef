"""A real uvicorn server on 127.0.0.1 (random free port) in a thread, and worker subprocesses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from crosspatch.app.config import Settings
from crosspatch.app.embedded import ServiceThread
from crosspatch.app.main import start_worker_process
from crosspatch.app.services.users import bootstrap_users


class LiveServer(ServiceThread):
    """`crosspatch serve` without the embedded worker, for tests: start(), url, stop()."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, embedded_worker=False, startup_timeout=20)


def client(server: LiveServer, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=f"{server.url}/api/v1", headers=headers, timeout=30)


def start_worker(
    settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A real worker process (`python -m crosspatch.app.worker --device cpu`) logging to `log_path`."""
    import os
    import sys

    from crosspatch.app.main import settings_env

    env = {**os.environ, **settings_env(settings), **(extra_env or {})}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "crosspatch.app.worker", "--device", "cpu"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


__all__ = ["LiveServer", "bootstrap_users", "client", "start_worker", "start_worker_process"]
