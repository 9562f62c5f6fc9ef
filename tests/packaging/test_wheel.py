"""The installed distribution exposes one import name, `crosspatch` (issue: one import name)."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_only_crosspatch(tmp_path: Path) -> None:
    """Build the wheel, install it (no deps) into a fresh venv: site-packages gains `crosspatch` and
    nothing named app, engine or saes; `import crosspatch` works there and finds its shipped data."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("crosspatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"crosspatch"}
    assert "crosspatch/migrations/env.py" in names and "crosspatch/alembic.ini" in names
    assert any(n.endswith("trained_llama/it/model.safetensors") for n in names)
    assert {"crosspatch/engine/data/holdout_600.jsonl", "crosspatch/engine/data/LICENSE-holdout"} <= set(
        names
    )
    assert {"crosspatch/app/web/templates/job.html", "crosspatch/app/web/static/style.css"} <= set(names)
    assert not any(
        n.startswith(("crosspatch/tests/", "crosspatch/bench/", "crosspatch/.venv/")) for n in names
    )

    # the fresh venv sees only what it installed: no PYTHONPATH from the caller's environment
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"

    def in_venv(code: str) -> str:
        """stdout of `python -c code` in the fresh venv, run from tmp_path (not the checkout)."""
        return subprocess.run(
            [py, "-c", code], env=clean_env, check=True, capture_output=True, text=True, cwd=tmp_path
        ).stdout

    site = in_venv("import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], env=clean_env, check=True
    )
    installed = {p.name for p in Path(site).iterdir() if not p.name.endswith(".dist-info")}
    assert "crosspatch" in installed
    assert not installed & {"app", "engine", "saes", "migrations", "tests"}
    out = in_venv("import crosspatch, sys; print(crosspatch.__file__); print(sorted(crosspatch.__all__))")
    assert out.splitlines()[0].startswith(site)
    assert "load_pair" in out and "mediate" in out
