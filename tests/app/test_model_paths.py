"""Model paths are checked by the process that opens them, on the real path; hub ids are never local paths.

The attack: a pair registered as `org/name` (a hub id to the API) where the worker's working directory
is the models root and `org/name` there is a symlink to a model outside the root.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import save_tiny_pair  # tests/helpers.py

from crosspatch.app.config import Settings
from crosspatch.app.errors import Invalid
from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.models import Pair
from crosspatch.app.worker.main import Worker


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Settings, Path, Path]:
    root, outside = tmp_path / "models", tmp_path / "outside"
    root.mkdir()
    pt, _ = save_tiny_pair(outside)  # a loadable model, outside the roots
    (root / "org").mkdir()
    (root / "org" / "name").symlink_to(pt)
    (root / "link").symlink_to(pt)
    settings = Settings(data_dir=tmp_path / "data", model_roots=[root], _env_file=None)  # type: ignore[call-arg]
    assert settings.database_url is not None
    upgrade(settings.database_url)
    return settings, root, pt


def _worker_with_pair(settings: Settings, pt: str, it: str) -> Worker:
    worker = Worker(settings, worker_id="w-test")
    with worker.store.session() as s:
        s.add(Pair(pair_id="p", family="llama", pt=pt, it=it, n_layers=4, default_boundary=2))
    return worker


def test_hub_id_naming_a_local_symlink_is_refused_by_the_worker(
    setup: tuple[Settings, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, root, _ = setup
    monkeypatch.chdir(root)  # the worker runs in the models root, where `org/name` is a symlink out
    worker = _worker_with_pair(settings, "org/name", "org/name")
    try:
        with pytest.raises(Invalid, match="names a path in this process's working directory"):
            worker.load_pair("p")
        assert worker._pair is None
    finally:
        worker.store.dispose()


def test_local_path_through_a_symlink_out_of_the_roots_is_refused(setup: tuple[Settings, Path, Path]) -> None:
    settings, root, _ = setup
    worker = _worker_with_pair(settings, str(root / "link"), str(root / "link"))
    try:
        with pytest.raises(Invalid, match="outside the allowed roots"):
            worker.load_pair("p")
    finally:
        worker.store.dispose()


@pytest.mark.parametrize("bad", ["org/../../etc", "org/name/extra", "org name/x", "-org/x"])
def test_hub_ids_are_judged_by_their_syntax(setup: tuple[Settings, Path, Path], bad: str) -> None:
    settings, _, _ = setup
    worker = _worker_with_pair(settings, bad, bad)
    try:
        with pytest.raises(Invalid, match="neither a hub id"):
            worker.load_pair("p")
    finally:
        worker.store.dispose()
