"""The admin and client commands against a real server (no worker: the job stays queued)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crosspatch.app.cli import main
from crosspatch.app.config import Settings, get_settings
from tests.app.live import LiveServer


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    try:
        main(list(args))
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


def test_admin_then_client_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("CROSSPATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CROSSPATCH_CLIENT_CONFIG", str(tmp_path / "none.json"))
    get_settings.cache_clear()
    try:
        out = _run(capsys, "admin", "create-user", "ada", "--role", "admin", "--with-key")
        key = out.strip().splitlines()[-1].split(": ")[-1]
        assert key.startswith("cpk_")
        _run(
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
            job_id = _run(
                capsys, "submit", "--pair", "hub-pair", "--prompts", str(prompts), "--boundary", "3", *common
            ).strip()
            job = json.loads(_run(capsys, "status", job_id, "--json", *common))
            assert (
                job["status"] == "queued"
                and job["spec"]["boundary"] == 3
                and len(job["spec"]["prompts"]) == 2
            )
            assert "submitted by ada" in _run(capsys, "logs", job_id, *common)
            assert "cancelled" in _run(capsys, "cancel", job_id, *common)
            with pytest.raises(SystemExit) as bad:
                main(["submit", "--pair", "nope", "--prompts", str(prompts), *common])
            assert bad.value.code == 1 and "unknown pair" in capsys.readouterr().err
        finally:
            server.stop()
    finally:
        get_settings.cache_clear()
