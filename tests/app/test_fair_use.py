"""Fair use of a shared server on SQLite and PostgreSQL: atomic quotas and a bounded priority band."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crosspatch.app.config import Settings
from crosspatch.app.errors import Invalid, QuotaExceeded
from crosspatch.app.queue import ops
from crosspatch.app.schemas.jobs import JobCreate
from crosspatch.app.services import jobs as service
from crosspatch.app.store.models import Job, User
from crosspatch.app.store.session import Store
from tests.app.builders import make_job, make_pair, make_user

N_SUBMITS, LIMIT = 40, 20


def _body(priority: int = 0) -> JobCreate:
    spec = {"kind": "divergence", "pair_id": "tiny-llama", "prompts": [{"id": "a", "text": "w1 w2"}]}
    return JobCreate.model_validate({"spec": spec, "priority": priority})


def _submit(store: Store, settings: Settings, user_id: int, body: JobCreate) -> None:
    with store.session() as s:
        user = s.get(User, user_id)
        assert user is not None
        service.submit(s, settings, user, body)


def test_quota_holds_exactly_under_40_concurrent_submits(store: Store, tmp_path: Path) -> None:
    """1 active job, limit 20, 40 submits at once: exactly 19 accepted (the race let 35 in on PG)."""
    settings = Settings(data_dir=tmp_path, max_active_jobs_per_user=LIMIT, _env_file=None)  # type: ignore[call-arg]
    alice = make_user(store, "alice")
    make_pair(store)
    make_job(store, alice, "tiny-llama")  # the one active job
    start = threading.Barrier(N_SUBMITS)

    def one(_: int) -> str:
        start.wait()
        try:
            _submit(store, settings, alice, _body())
        except QuotaExceeded:
            return "refused"
        return "accepted"

    with ThreadPoolExecutor(N_SUBMITS) as pool:
        outcomes = list(pool.map(one, range(N_SUBMITS)))
    assert outcomes.count("accepted") == LIMIT - 1
    assert outcomes.count("refused") == N_SUBMITS - LIMIT + 1
    with store.session(write=False) as s:
        assert s.query(Job).filter(Job.owner_id == alice).count() == LIMIT


def test_researchers_get_a_bounded_priority_band(store: Store, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    ada, root = make_user(store, "ada"), make_user(store, "root", role="admin")
    make_pair(store)
    for priority in (100, 1):
        with pytest.raises(Invalid, match=r"researchers may set priority -10\.\.0") as e:
            _submit(store, settings, ada, _body(priority))
        assert e.value.errors is not None and e.value.errors[0]["field"] == "priority"
    with pytest.raises(Invalid):
        _submit(store, settings, ada, _body(-11))
    _submit(store, settings, ada, _body(-10))
    _submit(store, settings, root, _body(100))
    with store.session(write=False) as s:
        assert sorted(j.priority for j in s.query(Job)) == [-10, 100]


def test_high_priority_jobs_do_not_jump_another_owners_turn(store: Store) -> None:
    """bob's job, submitted first, runs at its round-robin turn, not after alice's 10 priority-100 jobs."""
    alice, bob = make_user(store, "alice"), make_user(store, "bob")
    bobs = make_job(store, bob)
    alices = [make_job(store, alice, priority=100) for _ in range(10)]
    order = [ops.claim(store, "w1", lease_seconds=30) for _ in range(11)]
    assert order.index(bobs) <= 1  # alice's first (her priority breaks the tie of two fresh owners), then bob
    assert [j for j in order if j != bobs] == alices


def test_priority_orders_an_owners_own_jobs(store: Store) -> None:
    alice, bob = make_user(store, "alice"), make_user(store, "bob")
    a_low, a_high = make_job(store, alice, priority=-10), make_job(store, alice, priority=0)
    b = make_job(store, bob, priority=-5)
    order = [ops.claim(store, "w1", lease_seconds=30) for _ in range(3)]
    assert order == [a_high, b, a_low]
