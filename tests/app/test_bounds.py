"""Every input that costs work is bounded, with a 422 that names the field (a live server, no worker)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from crosspatch.app.config import Settings
from tests.app.live import client, config_only_pair, live_service

MAX_PROMPT_CHARS, MAX_FILE_BYTES, MAX_REQUEST = 1000, 200_000, 100_000


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("bounds")
    models = root / "models"
    config_only_pair(models)
    settings = Settings(
        data_dir=root / "data",
        model_roots=[models],
        dictionary_roots=[models],
        max_prompt_chars=MAX_PROMPT_CHARS,
        max_prompt_file_bytes=MAX_FILE_BYTES,
        max_request_bytes=MAX_REQUEST,
        max_active_jobs_per_user=1000,
        _env_file=None,  # type: ignore[call-arg]
    )
    users = {"root": "admin", "ada": "researcher"}
    with (
        live_service(settings, users, {"tiny": ("llama", models / "pt", models / "it")}) as (server, keys),
        client(server, keys["ada"]) as c,
    ):
        yield {"c": c, "models": models}


BASE = {"kind": "crosspatch", "pair_id": "tiny", "prompts": [{"id": "a", "text": "w1 w2"}]}
PIPE = {"kind": "pipeline", "pair_ids": ["tiny"], "prompts": [{"id": "a", "text": "w1 w2"}]}


def _refused(c: httpx.Client, spec: dict, field: str, reason: str = "") -> None:
    r = c.post("/jobs", json={"spec": spec})
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert any(e["field"] == field and reason in e["reason"] for e in errors), errors


def test_seeds_are_bounded_to_63_bits(env: dict) -> None:
    c = env["c"]
    _refused(c, {**BASE, "seed": 2**63}, "spec.crosspatch.seed", "less than or equal to 9223372036854775807")
    _refused(c, {**PIPE, "mediation": {"split_seed": 2**64}}, "spec.pipeline.mediation.split_seed")
    _refused(c, {**PIPE, "dictionary": {"seed": -1}}, "spec.pipeline.dictionary.seed")
    r = c.post("/jobs", json={"spec": {**BASE, "seed": 2**63 - 1}})
    assert r.status_code == 201 and r.json()["spec"]["seed"] == 2**63 - 1


def test_booleans_are_not_boundaries(env: dict) -> None:
    c = env["c"]
    _refused(c, {**BASE, "boundary": True}, "spec.crosspatch.boundary.int", "valid integer")
    _refused(c, {**BASE, "boundary": [1, False]}, "spec.crosspatch.boundary.list[int].1", "valid integer")
    _refused(c, {**PIPE, "boundary": True}, "spec.pipeline.boundary.int", "valid integer")
    r = c.post("/jobs", json={"spec": {**BASE, "boundary": 1}})
    assert r.status_code == 201 and r.json()["spec"]["boundary"] == 1


def test_ks_above_top_k_are_refused_and_defaults_follow_top_k(env: dict) -> None:
    c = env["c"]
    _refused(c, {**PIPE, "mediation": {"top_k": 4, "ks": [100]}}, "spec.pipeline.mediation", "exceed top_k=4")
    r = c.post("/jobs", json={"spec": {**PIPE, "mediation": {"top_k": 60}}})
    assert r.status_code == 201 and r.json()["spec"]["mediation"]["ks"] == [25, 50, 60]
    r = c.post("/jobs", json={"spec": PIPE})
    assert r.json()["spec"]["mediation"]["ks"] == [25, 50, 100, 200]


def test_training_tokens_are_bounded(env: dict) -> None:
    _refused(env["c"], {**PIPE, "dictionary": {"training_tokens": 10**11}}, "spec.dictionary.training_tokens")


def test_prompt_sizes_are_bounded_inline_and_in_files(env: dict) -> None:
    c, models = env["c"], env["models"]
    long = "w " * MAX_PROMPT_CHARS
    _refused(c, {**BASE, "prompts": [{"id": "a", "text": long}]}, "spec.prompts.0.text", "at most 1000")
    one_huge = models / "one_huge.jsonl"  # one prompt of 150 kB: under the file cap, over the prompt cap
    one_huge.write_text('{"id": "a", "prompt": "' + "w " * 75_000 + '"}\n')
    no_prompts = {k: v for k, v in BASE.items() if k != "prompts"}
    _refused(c, {**no_prompts, "prompt_file": str(one_huge)}, "spec.prompt_file", "line 1 is longer")
    big = models / "big.jsonl"  # many small prompts, over the file cap
    big.write_text("".join(f'{{"id": "{i}", "prompt": "w1 w2 w3"}}\n' for i in range(6000)))
    _refused(c, {**no_prompts, "prompt_file": str(big)}, "spec.prompt_file", "at most 200000 bytes")
    ok = models / "ok.jsonl"
    ok.write_text('{"id": "a", "prompt": "w1 w2"}\n')
    assert c.post("/jobs", json={"spec": {**no_prompts, "prompt_file": str(ok)}}).status_code == 201


def test_oversized_streamed_body_is_413_and_malformed_body_names_body(env: dict) -> None:
    c = env["c"]

    def chunks() -> Iterator[bytes]:  # no content-length: the limit must count the streamed bytes
        yield b'{"spec": {"kind": "crosspatch", "pair_id": "tiny", "prompts": ['
        for i in range(3000):
            yield b'{"id": "%d", "text": "w1 w2 w3 w4 w5 w6"},' % i
        yield b'{"id": "last", "text": "w1"}]}}'

    r = c.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large", r.text
    r = c.post("/jobs", content=b'{"spec": {"kind": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["body"], r.text
