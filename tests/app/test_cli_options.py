"""CLI options of the toolbox: one data dir for the demo, --device/--dtype where a model loads, progress bars
only on a terminal."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import cli_ok

from crosspatch.app.cli import main
from crosspatch.app.config import get_settings


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
    out = cli_ok(capsys, "demo", "--library", "--organism", "trained_llama", "--prompts-limit", "6")
    cells = pq.read_table(data_dir / "demo" / "cells.parquet")
    assert cells.num_rows > 0 and set(cells.column("pair_id").to_pylist()) == {"trained_llama"}
    assert str(data_dir / "demo" / "cells.parquet") in out
    assert not (data_dir.parent / ".crosspatch").exists()  # nothing in ./.crosspatch any more


def test_progress_bar_draws_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from crosspatch.app.cli.progress import progress_bar, progress_enabled

    monkeypatch.delenv("CROSSPATCH_PROGRESS", raising=False)
    assert progress_enabled(io.StringIO()) is False  # a pipe / file: no bar
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    assert progress_enabled(tty) is True
    monkeypatch.setenv("CROSSPATCH_PROGRESS", "0")
    assert progress_enabled(tty) is False
    with progress_bar("x", 4) as bar:  # disabled: a no-op that says so
        bar.update(3)
        assert bar.enabled is False
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with progress_bar("first divergence", 4, enabled=True, console=console) as bar:
        bar.update(3, note="batch 3")
    out = buf.getvalue()
    assert "first divergence" in out and "3/4" in out and "batch 3" in out


def test_run_shows_progress_when_forced_and_stays_plain_otherwise(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["run", "--organism", "trained_llama", "--limit", "6", "--max-new-tokens", "8"]
    monkeypatch.setenv("CROSSPATCH_PROGRESS", "1")
    try:
        main([*args, "--out", str(data_dir / "a.parquet")])
    except SystemExit as e:
        assert e.code in (0, None)
    err = capsys.readouterr().err
    assert "first divergence" in err and "6/6" in err and "2x2 cross-patch" in err
    monkeypatch.setenv("CROSSPATCH_PROGRESS", "0")
    try:
        main([*args, "--out", str(data_dir / "b.parquet")])
    except SystemExit as e:
        assert e.code in (0, None)
    captured = capsys.readouterr()
    # no bar of ours (an earlier in-process import may have left transformers' own loading bars on;
    # the console script turns those off before importing them)
    assert "first divergence" not in captured.err and "2x2 cross-patch" not in captured.err
    assert "wrote" in captured.out


def test_dict_cache_loads_models_with_device_and_dtype(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import torch

    from crosspatch.saes.cache import ActivationCache

    monkeypatch.setenv("CROSSPATCH_PROGRESS", "0")
    common = ["dict", "cache", "--organism", "trained_llama", "--layers", "last:1", "--hooks", "mlp_out"]
    # every prompt (not the mediation fit side, which depends on each dtype's divergences): the same tokens
    common += ["--max-tokens", "200", "--shard-tokens", "100", "--training-prompts", "all"]
    caches = {}
    for dtype in ("bfloat16", "float32"):
        out = json.loads(
            cli_ok(capsys, *common, "--dtype", dtype, "--device", "cpu", "--out", str(data_dir / dtype))
        )
        caches[dtype] = ActivationCache(out["cache"])
    bf16, fp32 = caches["bfloat16"], caches["float32"]
    assert bf16.manifest["model_load"]["it"] == {"device": "cpu", "dtype": "bfloat16"}
    assert fp32.manifest["model_load"]["pt"] == {"device": "cpu", "dtype": "float32"}
    key = f"it.L{bf16.layers[0]}.mlp_out"
    a, b = bf16.load([key]), fp32.load([key])  # stored as float32 either way
    assert a.dtype == torch.float32 and a.shape == b.shape
    # the bf16 model's activations are exactly bf16 values; the fp32 model's are not
    assert torch.equal(a, a.bfloat16().float())
    assert not torch.equal(b, b.bfloat16().float())
    assert torch.allclose(a, b, atol=0.1, rtol=0.05)


def test_worker_healthcheck(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from crosspatch.app.config import Settings
    from crosspatch.app.worker.__main__ import healthcheck

    ok = Settings(data_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    assert healthcheck(ok, "cpu") == 0
    assert "healthy: job store reachable, device cpu" in capsys.readouterr().out
    assert healthcheck(ok, "cuda:99") == 1
    assert "device cuda:99 is not available" in capsys.readouterr().err
    bad = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://u:p@127.0.0.1:1/x",
        _env_file=None,  # type: ignore[call-arg]
    )
    assert healthcheck(bad, "cpu") == 1
    assert "job store unreachable" in capsys.readouterr().err
