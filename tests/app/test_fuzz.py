"""Bad-input suite: schemathesis over the service's OpenAPI schema finds no 5xx.

A real uvicorn server on 127.0.0.1 (no worker: submitted jobs stay queued). Every operation is called
with generated valid and invalid inputs (examples, coverage and fuzzing phases, bounded examples) with
a researcher's key, and the admin-only ones again with an admin's key so their bodies are exercised.
Every answer must be below 500 and, when it is an error, JSON with a message.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from crosspatch.app.config import Settings
from crosspatch.app.main import create_app
from tests.app.live import client, config_only_pair, live_service, live_settings

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 25
ADMIN_ONLY = r"^/api/v1/(admin/.*|pairs)$"


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("fuzz")
    models = root / "models"
    pt, it = config_only_pair(models)
    (models / "prompts.jsonl").write_text('{"id": "a", "prompt": "w1 w2"}\n')
    settings_ = live_settings(root, [models], max_active_jobs_per_user=100_000)
    users = {"root": "admin", "ada": "researcher"}
    with live_service(settings_, users, {"tiny": ("llama", pt, it)}) as (server, keys):
        with client(server, keys["root"]) as admin:
            protected = {
                str(k["id"])
                for name in ("root", "ada")
                for k in admin.get(f"/admin/users/{name}/keys").json()["data"]
            }
        yield {"server": server, "keys": keys, "protected_keys": protected, "models": models}


# The schema of the app the live server runs (building the app does no I/O; its lifespan does).
schema = schemathesis.openapi.from_dict(create_app(Settings(_env_file=None)).openapi())  # type: ignore[call-arg]
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)


def _check(case: schemathesis.Case, base_url: str, key: str) -> None:
    response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body.get("message"), str) and body["message"], response.text
        assert "Traceback" not in response.text


# The SSE stream of a real unfinished job would never end; generated ids name no job anyway.
@schema.exclude(path_regex=r"/progress$").parametrize()
@FUZZ_SETTINGS
def test_no_server_errors_as_researcher(case: schemathesis.Case, fuzz_env: dict) -> None:
    _check(case, fuzz_env["server"].url, fuzz_env["keys"]["ada"])


@schema.include(path_regex=ADMIN_ONLY).parametrize()
@FUZZ_SETTINGS
def test_no_server_errors_as_admin(case: schemathesis.Case, fuzz_env: dict) -> None:
    key_id = (case.path_parameters or {}).get("key_id")
    if str(key_id) in fuzz_env["protected_keys"]:  # revoking the suite's own keys would end the run early
        case.path_parameters["key_id"] = f"-{key_id}"
    _check(case, fuzz_env["server"].url, fuzz_env["keys"]["root"])


def test_hand_written_bad_inputs(fuzz_env: dict) -> None:
    """Inputs schemathesis rarely builds: each is refused with a 4xx JSON error, never a 5xx."""
    with client(fuzz_env["server"], fuzz_env["keys"]["root"]) as admin:
        cases = [
            ("GET", "/jobs?offset=99999999999999999999999", None),
            ("POST", f"/admin/keys/{2**70}/revoke", None),
            ("POST", "/admin/users/ada/keys", {"label": "a\x00b"}),
            ("GET", "/admin/users/a%00b/keys", None),
            ("GET", "/dictionaries?family=a%00b", None),
            (
                "POST",
                "/pairs",
                {"pair_id": "p1", "family": "llama", "pt": "0" * 600, "it": "o/i", "n_layers": 2},
            ),
            (
                "POST",
                "/pairs",
                {"pair_id": "p3", "family": "llama", "pt": "o/p\x00", "it": "o/i", "n_layers": 2},
            ),
            ("POST", "/pairs", {"pair_id": "p4", "family": "llama", "pt": "~nosuchuser/x", "it": "o/i"}),
            (
                "POST",
                "/dictionaries",
                {
                    "id": "d1",
                    "path": "x" * 1000,
                    "family": "llama",
                    "layer": 1,
                    "hook_point": "h",
                    "width": 8,
                },
            ),
            (
                "POST",
                "/dictionaries",
                {
                    "id": "d2",
                    "path": "pt",
                    "family": "f",
                    "layer": 1,
                    "hook_point": "h",
                    "width": 8,
                    "training_tokens": 2**70,
                },
            ),
            ("POST", "/jobs", {"spec": {"kind": "divergence", "pair_id": "tiny", "prompt_file": "x" * 1000}}),
            (
                "POST",
                "/jobs",
                {"spec": {"kind": "divergence", "pair_id": "tiny", "prompt_file": "pt/config.json\x00"}},
            ),
            ("POST", "/jobs", {"spec": {"kind": "divergence", "pair_id": "tiny", "prompt_file": "pt"}}),
            (
                "POST",
                "/jobs",
                {
                    "spec": {
                        "kind": "crosspatch",
                        "pair_id": "tiny",
                        "prompts": [{"id": "a", "text": "w"}],
                        "boundary": 2**70,
                    }
                },
            ),
            (
                "POST",
                "/jobs",
                {
                    "spec": {"kind": "divergence", "pair_id": "tiny", "prompts": [{"id": "a", "text": "w"}]},
                    "priority": 2**70,
                },
            ),
        ]
        for method, path, body in cases:
            r = admin.request(method, path, json=body)
            assert 400 <= r.status_code < 500, f"{method} {path}: {r.status_code} {r.text}"
            assert r.json()["message"] and "Traceback" not in r.text
        # NaN/Infinity are not JSON, but Python's parser reads them: refuse rather than fail on output
        nan_body = b'{"id": "d3", "path": "pt", "family": "f", "layer": 1, "hook_point": "h", "width": 8, "metrics": {"mse": NaN}}'
        r = admin.post("/dictionaries", content=nan_body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        binary = fuzz_env["models"] / "weights.jsonl"
        binary.write_bytes(b"\xff\xfe\x00\x01" * 64)
        r = admin.post(
            "/jobs", json={"spec": {"kind": "divergence", "pair_id": "tiny", "prompt_file": str(binary)}}
        )
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "spec.prompt_file", r.text
