"""A small httpx client of the crosspatch service.

Server URL and key come from arguments, else CROSSPATCH_URL / CROSSPATCH_API_KEY, else the config file
`~/.config/crosspatch/client.json` ({"url": ..., "api_key": ...}; override with CROSSPATCH_CLIENT_CONFIG).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from crosspatch.engine.errors import CrosspatchError

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(CrosspatchError):
    """The server refused a request (its message), or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def config_path() -> Path:
    return Path(os.environ.get("CROSSPATCH_CLIENT_CONFIG", "~/.config/crosspatch/client.json")).expanduser()


def load_client_config() -> dict[str, str]:
    path = config_path()
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise ClientError(f"cannot read client config {path}: {e}") from None


class Client:
    """Typed-ish wrapper of the REST API (`/api/v1`)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 30.0) -> None:
        cfg = load_client_config()
        self.url = (url or os.environ.get("CROSSPATCH_URL") or cfg.get("url") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("CROSSPATCH_API_KEY") or cfg.get("api_key")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=f"{self.url}/api/v1", headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Send a request; a 4xx/5xx becomes `ClientError` with the server's message."""
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach the crosspatch server at {self.url}: {e}") from None
        if r.status_code >= 400:
            try:
                message = r.json().get("message") or r.text
            except ValueError:
                message = r.text
            raise ClientError(f"{r.status_code}: {message}", r.status_code)
        return r

    # ---- jobs --------------------------------------------------------------------------------
    def submit(self, spec: dict[str, Any], priority: int = 0) -> dict[str, Any]:
        return self.request("POST", "/jobs", json={"spec": spec, "priority": priority}).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}").json()

    def status(self, job_id: str) -> dict[str, Any]:
        """Status, progress, attempts and error only (cheap to poll)."""
        return self.request("GET", f"/jobs/{job_id}/status").json()

    def jobs(self, mine: bool = False, status: str | None = None, limit: int = 100) -> dict[str, Any]:
        params: dict[str, Any] = {"mine": mine, "limit": limit}
        if status:
            params["status"] = status
        return self.request("GET", "/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/cancel").json()

    def retry(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/retry").json()

    def logs(self, job_id: str, limit: int = 1000) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}/logs", params={"limit": limit}).json()

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll: float = 0.5,
    ) -> dict[str, Any]:
        """Poll until the job finishes (or `timeout` s pass: ClientError); returns the job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"job {job_id} still {job['status']} after {timeout:.0f}s")
            time.sleep(poll)

    # ---- results -----------------------------------------------------------------------------
    def results(self, job_id: str, table: str = "cells", limit: int = 10_000) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}/results/{table}", params={"limit": limit}).json()

    def results_parquet(self, job_id: str, table: str, out: Path, limit: int = 1_000_000) -> Path:
        r = self.request(
            "GET", f"/jobs/{job_id}/results/{table}", params={"format": "parquet", "limit": limit}
        )
        out.write_bytes(r.content)
        return out

    def provenance(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}/provenance").json()

    def top_features(
        self, family: str | None = None, limit: int = 20, **filters: str | int | float | bool | None
    ) -> dict[str, Any]:
        """Top mediating features; filters: dictionary_id, layer, min_events, intervention, include_failed_gate."""
        params: dict[str, Any] = {"limit": limit, **{k: v for k, v in filters.items() if v is not None}}
        if "include_failed_gate" in params:
            params["include_failed_gate"] = str(bool(params["include_failed_gate"])).lower()
        if family:
            params["family"] = family
        return self.request("GET", "/features/top", params=params).json()

    def feature_page(
        self, dictionary_id: str, latent: int, family: str | None = None, n_examples: int | None = None
    ) -> dict[str, Any]:
        """One feature's page (app.schemas.features.FeaturePage as JSON)."""
        params = {k: v for k, v in {"family": family, "n_examples": n_examples}.items() if v is not None}
        return self.request("GET", f"/features/page/{dictionary_id}/{latent}", params=params).json()

    # ---- catalog -----------------------------------------------------------------------------
    def cache(self, pair_id: str | None = None) -> dict[str, Any]:
        """The shared cache entries this key may see (GET /cache)."""
        return self.request("GET", "/cache", params={"pair_id": pair_id} if pair_id else None).json()

    def pairs(self) -> dict[str, Any]:
        return self.request("GET", "/pairs").json()

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health").json()
