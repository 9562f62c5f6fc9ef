"""Progress streams (SSE) are limited per researcher and in all: 429 past either, a slot back on close."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from crosspatch.app.config import Settings
from tests.app.live import client, config_only_pair, live_service

PER_USER, TOTAL = 2, 3


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root: Path = tmp_path_factory.mktemp("streams")
    models = root / "models"
    config_only_pair(models)
    settings = Settings(
        data_dir=root / "data",
        model_roots=[models],
        max_streams_per_user=PER_USER,
        max_streams_total=TOTAL,
        job_visibility="lab",
        _env_file=None,  # type: ignore[call-arg]
    )
    users = {"root": "admin", "ada": "researcher", "bob": "researcher"}
    pairs = {"tiny": ("llama", models / "pt", models / "it")}
    with live_service(settings, users, pairs) as (server, keys):
        with client(server, keys["ada"]) as ada:
            spec = {"kind": "crosspatch", "pair_id": "tiny", "prompts": [{"id": "a", "text": "w1"}]}
            job = ada.post("/jobs", json={"spec": spec}).json()["id"]  # no worker: it stays queued
        yield {"server": server, "keys": keys, "job": job}


def _open(stack: ExitStack, env: dict, who: str) -> httpx.Response:
    """Open a progress stream and keep it open (until `stack` closes); the response has its status."""
    c = stack.enter_context(client(env["server"], env["keys"][who]))
    return stack.enter_context(c.stream("GET", f"/jobs/{env['job']}/progress"))


def test_streams_are_limited_per_user_and_in_total(env: dict) -> None:
    with ExitStack() as ada_streams, ExitStack() as bob_streams:
        assert [_open(ada_streams, env, "ada").status_code for _ in range(PER_USER)] == [200] * PER_USER
        refused = _open(ada_streams, env, "ada")
        assert refused.status_code == 429 and "progress streams open" in refused.read().decode()
        assert _open(bob_streams, env, "bob").status_code == 200  # 3 of 3 in all
        refused = _open(bob_streams, env, "bob")
        assert refused.status_code == 429 and "the server holds 3" in refused.read().decode()
        bob_streams.close()  # bob's stream ends: the server frees its slot when it sees the disconnect
        deadline = time.monotonic() + 30  # (its next poll, 0.5 s; the bound only catches a leak)
        while True:
            with ExitStack() as probe:
                if _open(probe, env, "bob").status_code == 200:
                    break
            assert time.monotonic() < deadline, "a closed stream's slot never came back"
            time.sleep(0.1)
    with client(env["server"], env["keys"]["ada"]) as ada:
        assert ada.get(f"/jobs/{env['job']}/status").status_code == 200
