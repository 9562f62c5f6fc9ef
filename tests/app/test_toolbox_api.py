"""The researcher's toolbox over HTTP: OpenAPI security schemes that authenticate, pretrained dictionaries by
sae_lens id (allow-listed, resolved by a real worker from a local HF cache), the chat_template option."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BOUND  # tests/helpers.py

from crosspatch.app.client import Client
from crosspatch.app.worker.main import Worker
from crosspatch.engine.organisms import organism_path
from crosspatch.saes.load import pretrained_id
from tests.app.live import client, live_service, live_settings
from tests.saes.test_saes_pretrained import RELEASE, SAE_ID, _hf_cache

ORGANISM = "trained_gpt2"


# a template made of words the organism's tokenizer knows: "Q : <prompt> A :"
CHAT_TEMPLATE = "Q : {{ messages[0]['content'] }}{% if add_generation_prompt %} A :{% endif %}"


def _with_chat_template(org: Path, dest: Path) -> Path:
    """A copy of the organism whose IT tokenizer has a chat template."""
    import json
    import shutil

    shutil.copytree(org, dest)
    cfg_path = dest / "it" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
    return dest


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("toolbox")
    org = organism_path(ORGANISM)
    chat = _with_chat_template(org, root / "models" / "gpt2_chat")
    settings = live_settings(
        root,
        [org.parent, root / "models"],
        dictionary_roots=[root / "data"],
        pretrained_dictionaries=[f"{RELEASE}/blocks.*.hook_mlp_out"],
        poll_seconds=0.2,
    )
    users = {"root": "admin", "ada": "researcher"}
    pairs = {p: ("gpt2", d / "pt", d / "it") for p, d in ((ORGANISM, org), ("gpt2_chat", chat))}
    with live_service(settings, users, pairs) as (server, keys):
        yield {"server": server, "keys": keys, "settings": settings, "root": root}


def test_openapi_declares_the_key_schemes_and_a_key_sent_that_way_authenticates(env: dict) -> None:
    import functools

    import httpx

    get = functools.partial(httpx.get, timeout=30)  # httpx's default 5 s is short on a loaded machine
    base = f"{env['server'].url}/api/v1"
    doc = get(f"{env['server'].url}/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["APIKeyBearer"]["type"] == "http" and schemes["APIKeyBearer"]["scheme"] == "bearer"
    assert schemes["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The same API key in an `X-API-Key` header.",
    }
    jobs_get = doc["paths"]["/api/v1/jobs"]["get"]
    assert {"APIKeyBearer": []} in jobs_get["security"] and {"APIKeyHeader": []} in jobs_get["security"]
    key = env["keys"]["ada"]
    # what /docs "Authorize" sends for each scheme
    assert get(f"{base}/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert get(f"{base}/jobs", headers={"X-API-Key": key}).status_code == 200
    assert get(f"{base}/jobs").status_code == 401
    r = get(f"{base}/jobs", headers={"Authorization": f"Basic {key}"})
    assert r.status_code == 401 and "Bearer" in r.json()["message"]
    assert get(f"{base}/jobs", headers={"X-API-Key": "cpk_000000000000_nope"}).status_code == 401


def _load_spec(**over: object) -> dict:
    spec = {"kind": "load_dictionary", "pair_id": ORGANISM, "source": "sae_lens", "release": RELEASE}
    return {"spec": {**spec, "sae_id": SAE_ID, **over}}


def test_pretrained_dictionary_spec_is_checked_and_allow_listed(env: dict) -> None:
    with client(env["server"], env["keys"]["ada"]) as c:
        r = c.post("/jobs", json=_load_spec(sae_id="blocks.3.hook_resid_pre"))
        assert r.status_code == 422
        assert "not allow-listed" in r.json()["message"]
        assert "CROSSPATCH_PRETRAINED_DICTIONARIES" in r.json()["message"]
        r = c.post("/jobs", json=_load_spec(path="x/y"))
        assert r.status_code == 422 and "no 'path'" in r.text
        r = c.post(
            "/jobs", json={"spec": {"kind": "load_dictionary", "pair_id": ORGANISM, "source": "sae_lens"}}
        )
        assert r.status_code == 422 and "needs 'release' and 'sae_id'" in r.text


def test_worker_registers_a_pretrained_dictionary_from_the_local_cache(
    env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    hub = env["root"] / "hub"
    _hf_cache(hub)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    with Client(env["server"].url, env["keys"]["ada"], timeout=30) as c:
        job = c.submit(_load_spec()["spec"])
        assert Worker(env["settings"]).run(max_jobs=1, exit_when_idle=True) == 1
        job = c.wait(job["id"], timeout=BOUND)
        assert job["status"] == "succeeded", job.get("error")
        rows = {d["id"]: d for d in c.request("GET", "/dictionaries").json()["data"]}
    d = rows[pretrained_id(RELEASE, SAE_ID)]
    assert (d["layer"], d["hook_point"], d["width"], d["pair_id"]) == (3, "mlp_out", 32, ORGANISM)
    assert Path(d["path"]).is_relative_to(env["settings"].data_dir.resolve()) or Path(d["path"]).is_dir()
    assert (Path(d["path"]) / "cfg.json").exists()


def test_chat_template_option_is_applied_and_recorded(env: dict) -> None:
    from transformers import AutoTokenizer

    text = "black is 5 , green is 6 . Q : what is green ?"
    with Client(env["server"].url, env["keys"]["ada"], timeout=30) as c:
        jobs = {
            flag: c.submit(
                {
                    "kind": "divergence",
                    "pair_id": "gpt2_chat",
                    "chat_template": flag,
                    "prompts": [{"id": "a", "text": text}],
                    "max_new_tokens": 4,
                }
            )
            for flag in (False, True)
        }
        assert Worker(env["settings"]).run(max_jobs=2, exit_when_idle=True) == 2
        ids = {}
        for flag, job in jobs.items():
            done = c.wait(job["id"], timeout=BOUND)
            assert done["status"] == "succeeded", done.get("error")
            prov = c.request("GET", f"/jobs/{job['id']}/provenance").json()
            assert prov["provenance"]["chat_template"] is flag and prov["spec"]["chat_template"] is flag
            rows = c.request("GET", f"/jobs/{job['id']}/results/events").json()["data"]
            ids[flag] = rows[0]["prompt_ids"]
    tok = AutoTokenizer.from_pretrained(env["root"] / "models" / "gpt2_chat" / "it")
    assert ids[False] == tok.encode(text, add_special_tokens=True)
    templated = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    templated = list(templated["input_ids"] if hasattr(templated, "keys") else templated)
    assert ids[True] == templated == tok.encode("Q : " + text + " A :", add_special_tokens=False)
