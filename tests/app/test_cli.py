"""The admin and client commands against a real server (no worker: the job stays queued)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli_ok

from crosspatch.app.cli import main
from crosspatch.app.config import Settings, get_settings
from tests.app.live import LiveServer


def test_admin_then_client_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("CROSSPATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CROSSPATCH_CLIENT_CONFIG", str(tmp_path / "none.json"))
    get_settings.cache_clear()
    try:
        out = cli_ok(capsys, "admin", "create-user", "ada", "--role", "admin", "--with-key")
        key = out.strip().splitlines()[-1].split(": ")[-1]
        assert key.startswith("cpk_")
        cli_ok(
            capsys,
            "admin",
            "add-pair",
            "hub-pair",
            "--pt",
            "org/pt",
            "--it",
            "org/it",
            "--family",
            "llama",
            "--n-layers",
            "6",
        )
        server = LiveServer(Settings(data_dir=tmp_path / "data", _env_file=None)).start()  # type: ignore[call-arg]
        try:
            prompts = tmp_path / "p.jsonl"
            prompts.write_text('{"id": "a", "prompt": "w1 w2"}\n{"id": "b", "prompt": "w3"}\n')
            common = ["--url", server.url, "--key", key]
            job_id = cli_ok(
                capsys, "submit", "--pair", "hub-pair", "--prompts", str(prompts), "--boundary", "3", *common
            ).strip()
            job = json.loads(cli_ok(capsys, "status", job_id, "--json", *common))
            assert (
                job["status"] == "queued"
                and job["spec"]["boundary"] == 3
                and len(job["spec"]["prompts"]) == 2
            )
            assert "submitted by ada" in cli_ok(capsys, "logs", job_id, *common)
            assert "cancelled" in cli_ok(capsys, "cancel", job_id, *common)
            with pytest.raises(SystemExit) as bad:
                main(["submit", "--pair", "nope", "--prompts", str(prompts), *common])
            assert bad.value.code == 1 and "unknown pair" in capsys.readouterr().err
        finally:
            server.stop()
    finally:
        get_settings.cache_clear()
