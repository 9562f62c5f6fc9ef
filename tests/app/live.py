"""A real uvicorn server on 127.0.0.1 (random free port) in a thread, and worker subprocesses."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from helpers import BOUND  # tests/helpers.py

from crosspatch.app.config import Settings
from crosspatch.app.embedded import ServiceThread
from crosspatch.app.main import start_worker_process
from crosspatch.app.services.users import bootstrap_users


class LiveServer(ServiceThread):
    """`crosspatch serve` without the embedded worker, for tests: start(), url, stop()."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, embedded_worker=False, startup_timeout=BOUND)  # a bound, not a wait


def client(server: LiveServer, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=f"{server.url}/api/v1", headers=headers, timeout=30)


def finished_job(c: httpx.Client, job_id: str) -> dict:
    """The job once it has ended: follows its SSE progress stream to the `end` event (no polling, no clock;
    BOUND only catches a stream that goes silent)."""
    with c.stream("GET", f"/jobs/{job_id}/progress", timeout=BOUND) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: end"):
                break
    return c.get(f"/jobs/{job_id}").json()


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


def live_settings(root: Path, model_roots: list[Path], **overrides: Any) -> Settings:
    """Settings of a test service under `root` (data in `root/data`; dictionaries beside the models)."""
    overrides.setdefault("dictionary_roots", list(model_roots))
    return Settings(data_dir=root / "data", model_roots=list(model_roots), _env_file=None, **overrides)  # type: ignore[call-arg]


def config_only_pair(models: Path) -> tuple[Path, Path]:
    """`models/pt`, `models/it` holding only a Llama config.json: registers as a pair, never loads."""
    for d in ("pt", "it"):
        (models / d).mkdir(parents=True, exist_ok=True)
        (models / d / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 5}')
    return models / "pt", models / "it"


@contextlib.contextmanager
def live_service(
    settings: Settings,
    users: dict[str, str],
    pairs: dict[str, tuple[str, Path, Path]],
    worker_log: Path | None = None,
) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """A live server with `users` {name: role} (the first admin registers `pairs` {pair_id: (family, pt,
    it)}) and, given `worker_log`, one worker process; yields (server, keys by user); stops both after."""
    keys = bootstrap_users(settings, users)
    server = LiveServer(settings).start()
    worker = start_worker(settings, worker_log) if worker_log is not None else None
    try:
        admin = next((name for name, role in users.items() if role == "admin"), None)
        assert admin is not None or not pairs, "registering pairs needs an admin among the users"
        with client(server, keys[admin] if admin else None) as c:
            for pair_id, (family, pt, it) in pairs.items():
                r = c.post(
                    "/pairs", json={"pair_id": pair_id, "family": family, "pt": str(pt), "it": str(it)}
                )
                assert r.status_code == 201, r.text
        yield server, keys
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=BOUND)
        server.stop()


__all__ = [
    "LiveServer",
    "bootstrap_users",
    "client",
    "config_only_pair",
    "live_service",
    "live_settings",
    "start_worker",
    "start_worker_process",
]
