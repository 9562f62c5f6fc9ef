"""ORM models of the job store (SQLAlchemy 2 typed mappings).

Every schema change here gets an Alembic revision in `migrations/`; `tests/app/test_migrations.py`
fails when the two disagree. Times are naive UTC (`utcnow()`), the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ROLES = ("admin", "researcher")
JOB_STATUSES = ("submitted", "queued", "running", "ingesting", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("submitted", "queued", "running", "ingesting")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
JOB_KINDS = (
    "divergence",
    "crosspatch",
    "train_dictionary",
    "load_dictionary",
    "mediation",
    "pipeline",
    "lineage",
    "forced_tokens",
    "continuation",
    "lora_control",
)
MODEL_ROLES = ("PT", "IT", "paired")
SHARES = ("lab", "owner")


def utcnow() -> datetime:
    """Now, as naive UTC (how every time in the job store is kept)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so every constraint has a stable name."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """A researcher or admin of the lab server."""

    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="researcher")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ApiKey(Base):
    """An API key: only a short lookup prefix and the SHA-256 of the whole key are stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


class Pair(Base):
    """An allow-listed PT/IT pair researchers may run."""

    __tablename__ = "pairs"

    pair_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    family: Mapped[str] = mapped_column(String(32), index=True)
    pt: Mapped[str] = mapped_column(String(512))
    it: Mapped[str] = mapped_column(String(512))
    n_layers: Mapped[int] = mapped_column(Integer)
    default_boundary: Mapped[int] = mapped_column(Integer)
    pt_revision: Mapped[str | None] = mapped_column(String(128))
    it_revision: Mapped[str | None] = mapped_column(String(128))
    estimated_memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    """One job: its spec, where it is in its life, who holds its lease, and what it reported."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint(_in("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_in("share", SHARES), name="share"),
        Index("ix_jobs_status_priority", "status", "priority"),
        Index("ix_jobs_owner_status", "owner_id", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    pair_id: Mapped[str | None] = mapped_column(ForeignKey("pairs.pair_id"))
    estimated_memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    losses: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0"
    )  # leases expired (worker lost)
    share: Mapped[str] = mapped_column(String(8), default="lab", server_default="lab")  # who reads results
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class JobLog(Base):
    """One log line a worker (or the service) wrote about a job."""

    __tablename__ = "job_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="INFO")
    message: Mapped[str] = mapped_column(Text)


class JobAttempt(Base):
    """One claim of a job: which worker held it, when, and how that attempt ended (history survives retries)."""

    __tablename__ = "job_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(128))
    claimed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    # finished | failed | released | worker_lost | cancelled; None while it runs
    outcome: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)


class JobPart(Base):
    """A finished checkpoint part: one Parquet file of one results table, written by a worker."""

    __tablename__ = "job_parts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_job_parts_job_id_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    part_index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128))
    table_name: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(String(1024))
    rows: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Dictionary(Base):
    """A sparse dictionary (SAE, transcoder, crosscoder) known to the service."""

    __tablename__ = "dictionaries"
    __table_args__ = (CheckConstraint(_in("model_role", MODEL_ROLES), name="model_role"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    pair_id: Mapped[str | None] = mapped_column(ForeignKey("pairs.pair_id"))
    family: Mapped[str] = mapped_column(String(32), index=True)
    model_role: Mapped[str] = mapped_column(String(8))
    layer: Mapped[int] = mapped_column(Integer)
    hook_point: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    architecture: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    k: Mapped[float | None] = mapped_column(Float)  # active latents per token; batch-top-k may be fractional
    training_tokens: Mapped[int | None] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    gate_status: Mapped[str] = mapped_column(String(16), default="unknown")
    path: Mapped[str] = mapped_column(String(1024))
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class CacheEntry(Base):
    """A computed state shared across jobs (dictionary + activation cache), content-addressed by `key`.

    Readable by whoever may read the results of `job_id` (its owner, admins, or the lab when the job is
    shared); `last_used_at` orders LRU eviction under `Settings.shared_cache_bytes`.
    """

    __tablename__ = "cache_entries"
    __table_args__ = (UniqueConstraint("key", "owner_id", name="uq_cache_entries_key_owner_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    pair_id: Mapped[str | None] = mapped_column(String(64), index=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the key's inputs, for `cache ls`
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
