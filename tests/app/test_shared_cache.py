"""The shared cache: a dictionary (with its activation cache) one researcher's job trained is reused by
another's job on the same pair, prompts and settings; another setting misses; a private job's entry is
neither listed nor reused for someone else; past the size cap the least recently used entry goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from crosspatch.app.config import Settings, get_settings
from crosspatch.app.queue import ops
from crosspatch.app.services.cache import list_entries
from crosspatch.app.store.layout import parts_dir
from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.models import CacheEntry, Job, User
from crosspatch.app.worker.main import Worker
from tests.app.builders import make_job, make_pair, make_user
from tests.helpers import cli_ok, random_prompts, tiny_pair

PROMPTS = [{"id": p.id, "text": p.text, "category": p.category} for p in random_prompts(6, seed=7)]
OPTIONS = dict(architecture="topk", width=16, k=1, training_tokens=512, continuation_tokens=8, batch_size=64)
OPTIONS.update(training_prompts="all", min_heldout_tokens=10)


def _spec(seed: int) -> dict:
    return {
        "kind": "train_dictionary",
        "pair_id": "tiny-llama",
        "prompts": PROMPTS,
        "dictionary": {**OPTIONS, "seed": seed},
    }


def _run(worker: Worker, owner: int, seed: int, share: str = "lab") -> Job:
    job_id = make_job(
        worker.store, owner, "tiny-llama", kind="train_dictionary", spec=_spec(seed), share=share
    )
    assert ops.claim(worker.store, worker.worker_id, lease_seconds=30.0) == job_id
    assert worker.run_one(job_id) == "ingesting"
    with worker.store.session(write=False) as s:
        job = s.get(Job, job_id)
        s.expunge(job)
    return job


def _weights(root: Path) -> Path:
    """The trained dictionary's weights file under a job's or an entry's directory."""
    (path,) = [p for p in root.rglob("sae_weights.safetensors") if "checkpoint" not in str(p)]
    return path


def _keys(worker: Worker, user_id: int) -> set[str]:
    with worker.store.session(write=False) as s:
        return {e["key"] for e in list_entries(s, s.get(User, user_id))}


def test_shared_cache_reuse_access_and_lru(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade(settings.database_url)
    worker = Worker(settings)
    worker._pair, worker._pair_id = tiny_pair("llama", it_scale=0.05, seed=3), "tiny-llama"
    make_pair(worker.store, "tiny-llama")
    ada, bob, carol, dave = (make_user(worker.store, n) for n in ("ada", "bob", "carol", "dave"))
    admin = make_user(worker.store, "root", role="admin")

    first = _run(worker, ada, seed=0)
    record = first.provenance["shared_cache"]["dictionary"]
    assert record["hit"] is False and record["stored_bytes"] > 0
    size = record["stored_bytes"]
    worker.shared_cache.cap_bytes = int(2.5 * size)  # room for two entries of this size

    # bob, same pair / prompts / settings: reused, not retrained (his weights are ada's file, hard-linked)
    second = _run(worker, bob, seed=0)
    hit = second.provenance["shared_cache"]["dictionary"]
    assert hit == {"key": record["key"], "hit": True, "from_job": str(first.id), "entry_owner": ada}
    with worker.store.session(write=False) as s:
        (entry,) = s.query(CacheEntry).all()
        entry_dir, entry_key = Path(entry.path), entry.key
        assert entry.hits == 1 and entry.owner_id == ada and entry.job_id == first.id
    mine = _weights(parts_dir(settings.data_dir, second.id))
    assert mine.stat().st_ino == _weights(entry_dir).stat().st_ino  # no recomputation: the same bytes
    assert (
        second.provenance["dictionaries"]["tiny-llama"]["id"]
        == first.provenance["dictionaries"]["tiny-llama"]["id"]
    )

    # another setting misses and is stored apart
    third = _run(worker, bob, seed=1)
    assert third.provenance["shared_cache"]["dictionary"]["hit"] is False
    bob_key = third.provenance["shared_cache"]["dictionary"]["key"]
    assert bob_key != entry_key and _keys(worker, dave) == {entry_key, bob_key}

    # carol's private job: stored for her, evicting the LRU entry (ada's, last used by bob's first job)
    private = _run(worker, carol, seed=2, share="owner")
    carol_key = private.provenance["shared_cache"]["dictionary"]["key"]
    assert not entry_dir.exists() and mine.is_file()  # bob's job keeps its hard-linked copy
    assert _keys(worker, carol) == {bob_key, carol_key}
    assert _keys(worker, dave) == {bob_key}  # not listed for another researcher
    assert _keys(worker, admin) == {bob_key, carol_key}

    # dave, same inputs as carol's private job: not reused (computed and stored for him)
    daves = _run(worker, dave, seed=2)
    assert daves.provenance["shared_cache"]["dictionary"]["key"] == carol_key
    assert daves.provenance["shared_cache"]["dictionary"]["hit"] is False
    assert _keys(worker, dave) == {carol_key}  # his own; bob's (LRU) went past the cap, carol's stays hidden
    assert _keys(worker, admin) == {carol_key}  # key shared by carol's and dave's entries
    with worker.store.session(write=False) as s:
        entries = s.query(CacheEntry).all()
        assert sorted(e.owner_id for e in entries) == sorted([carol, dave])
        total = sum(e.size_bytes for e in entries)
    worker.store.dispose()

    # `crosspatch cache ls --local` on the server host lists every entry
    monkeypatch.setenv("CROSSPATCH_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    try:
        out = cli_ok(capsys, "cache", "ls", "--local")
    finally:
        get_settings.cache_clear()
    assert out.startswith(f"2 entries, {total} bytes") and out.count(carol_key[:12]) == 2
