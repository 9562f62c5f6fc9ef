"""The durable queue on SQLite and PostgreSQL: atomic claims, policy, leases, requeue, cancel."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from crosspatch.app.queue import ops
from crosspatch.app.services import jobs as jobs_service
from crosspatch.app.store.models import Job, User, utcnow
from crosspatch.app.store.session import Store
from tests.app.builders import make_job, make_pair, make_user


def _claim(store: Store, worker: str = "w1", **kw) -> object:
    return ops.claim(store, worker, lease_seconds=30, **kw)


def test_claim_priority_then_age(store: Store) -> None:
    alice = make_user(store, "alice")
    old = make_job(store, alice)
    urgent = make_job(store, alice, priority=5)
    assert _claim(store) == urgent
    assert _claim(store) == old
    assert _claim(store) is None


def test_fair_share_round_robin_by_owner(store: Store) -> None:
    alice, bob = make_user(store, "alice"), make_user(store, "bob")
    a = [make_job(store, alice) for _ in range(3)]
    b = make_job(store, bob)
    order = [_claim(store) for _ in range(4)]
    assert order == [a[0], b, a[1], a[2]]


def test_prefers_loaded_pair_and_respects_memory(store: Store) -> None:
    alice = make_user(store, "alice")
    make_pair(store, "p1")
    make_pair(store, "p2")
    big = make_job(store, alice, "p1", estimated_memory_bytes=10 << 30)
    on_p1 = make_job(store, alice, "p1")
    on_p2 = make_job(store, alice, "p2")
    assert _claim(store, memory_bytes=1 << 30, loaded_pair="p2") == on_p2
    assert _claim(store, memory_bytes=1 << 30, loaded_pair="p2") == on_p1
    assert _claim(store, memory_bytes=1 << 30) is None
    assert _claim(store, memory_bytes=16 << 30) == big


def test_claims_are_exclusive_under_concurrency(store: Store) -> None:
    alice = make_user(store, "alice")
    ids = {make_job(store, alice) for _ in range(12)}

    def drain(worker: str) -> list:
        got = []
        while (job := _claim(store, worker)) is not None:
            got.append(job)
        return got

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(drain, [f"w{i}" for i in range(4)]))
    claimed = [j for r in results for j in r]
    assert sorted(claimed) == sorted(ids)


def test_expired_lease_requeues_then_fails_after_max_losses(store: Store) -> None:
    alice = make_user(store, "alice")
    job = make_job(store, alice)
    assert ops.claim(store, "w1", lease_seconds=30) == job
    claimed = utcnow()
    # the clock is passed in: no sleeping, no race with a tiny lease on a loaded machine
    assert ops.requeue_expired(store, max_losses=2, now=claimed + timedelta(seconds=20)) == []  # still valid
    assert ops.requeue_expired(store, max_losses=2, now=claimed + timedelta(seconds=31)) == [job]
    assert not ops.heartbeat(store, job, "w1", lease_seconds=30)  # the dead worker lost it
    assert ops.claim(store, "w2", lease_seconds=30) == job
    reclaimed = utcnow()
    assert ops.requeue_expired(store, max_losses=2, now=reclaimed + timedelta(seconds=31)) == []
    with store.session() as s:
        row = s.get(Job, job)
        assert row is not None
        assert (row.status, row.attempts, row.losses) == ("failed", 2, 2)
        assert "lease expired" in (row.error or "")


def test_heartbeat_and_finish_only_while_held(store: Store) -> None:
    alice = make_user(store, "alice")
    job = make_job(store, alice)
    assert _claim(store, "w1") == job
    assert ops.heartbeat(store, job, "w1", lease_seconds=30, progress={"fraction": 0.5})
    assert not ops.heartbeat(store, job, "intruder", lease_seconds=30)
    assert ops.cancel(store, job)
    assert not ops.heartbeat(store, job, "w1", lease_seconds=30)
    assert not ops.finish_running(store, job, "w1", status="ingesting")
    assert ops.status_of(store, job) == "cancelled"


def test_release_returns_job_without_spending_an_attempt(store: Store) -> None:
    alice = make_user(store, "alice")
    job = make_job(store, alice)
    assert _claim(store, "w1") == job
    assert ops.finish_running(store, job, "w1", status="queued")
    assert _claim(store, "w2") == job
    with store.session() as s:
        assert s.get(Job, job).attempts == 1  # type: ignore[union-attr]


def test_attempts_history_survives_retry_and_losses_are_counted_apart(store: Store) -> None:
    """Each claim is a history row with its worker and end; a retry keeps them; losses have their own cap."""
    alice = make_user(store, "alice")
    job = make_job(store, alice)
    assert _claim(store, "w1") == job
    lost_at = utcnow() + timedelta(seconds=31)
    assert ops.requeue_expired(store, max_losses=3, now=lost_at) == [job]  # loss 1 of 3: re-queued
    assert _claim(store, "w2") == job
    assert ops.finish_running(store, job, "w2", status="failed", error="boom")
    with store.session() as s:
        user = s.get(User, alice)
        assert user is not None
        jobs_service.retry(s, job, user)
    assert _claim(store, "w3") == job
    assert ops.finish_running(store, job, "w3", status="ingesting")
    history = [(a["attempt"], a["worker_id"], a["outcome"], a["detail"]) for a in ops.attempts(store, job)]
    assert history == [
        (1, "w1", "worker_lost", "lease expired; re-queued"),
        (2, "w2", "failed", "boom"),
        (3, "w3", "finished", None),
    ]
    with store.session() as s:
        row = s.get(Job, job)
        assert row is not None and (row.attempts, row.losses) == (3, 0)  # the retry reset losses only


def test_three_worker_losses_do_not_fail_a_job_under_a_higher_loss_cap(store: Store) -> None:
    alice = make_user(store, "alice")
    job = make_job(store, alice)
    for i in range(3):
        assert _claim(store, f"w{i}") == job
        assert ops.requeue_expired(store, max_losses=10, now=utcnow() + timedelta(seconds=31)) == [job]
    assert ops.status_of(store, job) == "queued"
    with store.session() as s:
        row = s.get(Job, job)
        assert row is not None and (row.attempts, row.losses) == (3, 3)


def test_cancel_and_retry_refuse_the_wrong_status_with_a_409(store: Store) -> None:
    """Retry only from failed/cancelled, cancel only while active: anything else is a Conflict naming the status."""
    import pytest

    from crosspatch.app.errors import Conflict

    alice = make_user(store, "alice")
    job = make_job(store, alice)
    with store.session() as s:
        user = s.get(User, alice)
        assert user is not None
        with pytest.raises(Conflict, match=f"can be retried; job {job} is queued"):
            jobs_service.retry(s, job, user)
        assert jobs_service.cancel(s, job, user).status == "cancelled"
        with pytest.raises(Conflict, match=f"job {job} is already cancelled"):
            jobs_service.cancel(s, job, user)
        assert jobs_service.retry(s, job, user).status == "queued"
