"""CLI options of the toolbox: one data dir for the demo, --device/--dtype where a model loads, progress bars
only on a terminal."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from crosspatch.app.cli import main
from crosspatch.app.config import get_settings


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    try:
        main(list(args))
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CROSSPATCH_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path / "data"
    get_settings.cache_clear()


def test_demo_writes_under_the_data_dir_by_default(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(data_dir.parent)
    out = _run(capsys, "demo", "--library", "--organism", "trained_llama", "--prompts-limit", "6")
    cells = pq.read_table(data_dir / "demo" / "cells.parquet")
    assert cells.num_rows > 0 and set(cells.column("pair_id").to_pylist()) == {"trained_llama"}
    assert str(data_dir / "demo" / "cells.parquet") in out
    assert not (data_dir.parent / ".crosspatch").exists()  # nothing in ./.crosspatch any more
