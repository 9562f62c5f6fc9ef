"""Settings: placeholder secrets are refused in prod; a prod SQLite job store logs a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from crosspatch.app.config import Settings


def _settings(tmp_path: Path, **kw) -> Settings:
    return Settings(data_dir=tmp_path, _env_file=None, **kw)  # type: ignore[call-arg]


@pytest.mark.parametrize("password", ["", "changeme", "CHANGE-ME", "password", "postgres", "crosspatch"])
def test_prod_refuses_placeholder_database_passwords(tmp_path: Path, password: str) -> None:
    url = f"postgresql+psycopg://crosspatch:{password}@db:5432/crosspatch"
    with pytest.raises(ValidationError, match="placeholder password") as e:
        _settings(tmp_path, env="prod", database_url=url)
    assert "crosspatch:***@db" in str(e.value)  # the password is never echoed


def test_prod_accepts_real_passwords_and_dev_accepts_anything(tmp_path: Path) -> None:
    real = "postgresql+psycopg://crosspatch:9f2c41d0a7b3e8c6@db:5432/crosspatch"
    assert _settings(tmp_path, env="prod", database_url=real).database_url == real
    no_password = "postgresql+psycopg://crosspatch@db/crosspatch"  # peer / .pgpass auth
    assert _settings(tmp_path, env="prod", database_url=no_password).env == "prod"
    placeholder = "postgresql+psycopg://crosspatch:changeme@db/crosspatch"
    assert _settings(tmp_path, database_url=placeholder).env == "dev"


def test_prod_sqlite_logs_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="crosspatch.app.config"):
        _settings(tmp_path, env="prod")
    assert any("SQLite job store" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crosspatch.app.config"):
        _settings(tmp_path)
    assert not caplog.records
