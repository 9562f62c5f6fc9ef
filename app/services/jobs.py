"""Submitting, listing, cancelling, retrying and deleting jobs."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from crosspatch.app.config import Settings
from crosspatch.app.errors import Conflict, Invalid, QuotaExceeded
from crosspatch.app.queue import ops
from crosspatch.app.schemas.jobs import JobCreate, JobPublic
from crosspatch.app.services.paths import model_ref_to_open, resolve_under
from crosspatch.app.store.duckdb import ResultsStore
from crosspatch.app.store.layout import parts_dir
from crosspatch.app.store.models import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Dictionary,
    Job,
    JobLog,
    JobPart,
    Pair,
    User,
    utcnow,
)

# A prompt file's line holds one prompt plus its JSON (id, category, formats): this much room for those.
LINE_OVERHEAD_CHARS = 1024


def _count_lines(path: str | Path, stop_after: int, max_chars: int) -> int:
    """Non-empty lines of a prompt file (stops past `stop_after`); 422 on a line too long to be a prompt
    of at most `max_chars` (never reads more than one line's cap into memory)."""
    cap = max_chars + LINE_OVERHEAD_CHARS
    n = 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(iter(lambda: f.readline(cap + 2), ""), start=1):
            if len(line.rstrip("\r\n")) > cap:
                raise Invalid(
                    "spec.prompt_file",
                    f"line {i} is longer than {cap} characters; this server allows prompts of at most "
                    f"{max_chars} characters",
                )
            n += bool(line.strip())
            if n > stop_after:
                break
    return n


def _check_prompts(spec: Any, settings: Settings) -> None:
    limit = settings.max_prompts_per_job
    if getattr(spec, "prompts", None) is not None and len(spec.prompts) > limit:
        raise Invalid(
            "spec.prompts", f"{len(spec.prompts)} prompts; this server allows at most {limit} per job"
        )
    for i, p in enumerate(getattr(spec, "prompts", None) or []):
        if len(p.text) > settings.max_prompt_chars:
            raise Invalid(
                f"spec.prompts.{i}.text",
                f"{len(p.text)} characters; this server allows at most {settings.max_prompt_chars}",
            )
    if getattr(spec, "prompt_file", None) is not None:
        path = resolve_under(spec.prompt_file, settings.model_roots, "spec.prompt_file")
        if not path.is_file():
            raise Invalid("spec.prompt_file", "not a file")
        size, max_size = path.stat().st_size, settings.max_prompt_file_bytes
        if size > max_size:
            raise Invalid(
                "spec.prompt_file",
                f"{size} bytes; this server allows prompt files of at most {max_size} bytes",
            )
        try:
            n = _count_lines(path, limit, settings.max_prompt_chars)
        except (OSError, UnicodeDecodeError) as e:
            raise Invalid("spec.prompt_file", f"cannot read it as UTF-8 JSONL: {e}") from e
        if n > limit:
            raise Invalid(
                "spec.prompt_file", f"more than {limit} prompts; this server allows at most {limit}"
            )
        spec.prompt_file = str(path)


def _check_pair(session: Session, pair_id: str, field: str) -> Pair:
    pair = session.get(Pair, pair_id)
    if pair is None:
        known = ", ".join(session.scalars(select(Pair.pair_id).order_by(Pair.pair_id).limit(20))) or "none"
        raise Invalid(field, f"unknown pair {pair_id!r}; allow-listed pairs: {known}")
    return pair


def _check_boundary(boundary: Any, pair: Pair, field: str = "spec.boundary") -> None:
    values = [] if boundary in (None, "sweep") else [boundary] if isinstance(boundary, int) else boundary
    for b in values:
        if not 0 <= b <= pair.n_layers:
            raise Invalid(
                field,
                f"boundary {b} out of range: pair {pair.pair_id!r} has {pair.n_layers} layers (0..{pair.n_layers})",
            )


def validate_spec(session: Session, settings: Settings, body: JobCreate) -> tuple[str | None, int]:
    """Check a spec against the allow-list and the server's limits; returns (pair_id, memory)."""
    spec = body.spec
    _check_prompts(spec, settings)
    pair_ids = list(spec.pair_ids) if spec.kind == "pipeline" else [spec.pair_id]
    field = "spec.pair_ids" if spec.kind == "pipeline" else "spec.pair_id"
    pairs = [_check_pair(session, p, field) for p in pair_ids]
    if hasattr(spec, "boundary"):
        for pair in pairs:
            _check_boundary(spec.boundary, pair)
    if spec.kind == "mediation":
        d = session.get(Dictionary, spec.dictionary_id)
        if d is None:
            raise Invalid("spec.dictionary_id", f"unknown dictionary {spec.dictionary_id!r}")
        if spec.mediation.top_k > d.width:
            raise Invalid(
                "spec.mediation.top_k",
                f"top_k={spec.mediation.top_k} exceeds the dictionary's width {d.width}",
            )
    if spec.kind in ("pipeline", "train_dictionary"):
        tokens = spec.dictionary.training_tokens
        if tokens is not None and tokens > settings.max_training_tokens:
            raise Invalid(
                "spec.dictionary.training_tokens",
                f"{tokens} tokens; this server allows at most {settings.max_training_tokens} per dictionary",
            )
        width = spec.dictionary.width
        if spec.kind == "pipeline" and width is not None and spec.mediation.top_k > width:
            raise Invalid(
                "spec.mediation.top_k", f"top_k={spec.mediation.top_k} exceeds the dictionary width {width}"
            )
        if spec.dictionary.layer is not None:
            for p in pairs:
                if spec.dictionary.layer >= p.n_layers:
                    raise Invalid(
                        "spec.dictionary.layer",
                        f"layer {spec.dictionary.layer} out of range for {p.pair_id!r}",
                    )
    if spec.kind == "lineage":  # stages: registered pairs, or model paths under the model roots
        for i, stage in enumerate(spec.stages):
            if stage.pair_id is not None:
                _check_pair(session, stage.pair_id, f"spec.stages.{i}.pair_id")
            else:
                stage.path = str(resolve_under(stage.path, settings.model_roots, f"spec.stages.{i}.path"))
    if getattr(spec, "controls", None):
        _check_control_options(session, settings, spec.control_options, pairs)
    if spec.kind == "load_dictionary" and spec.source == "sae_lens":
        _check_pretrained_allowed(settings, f"{spec.release}/{spec.sae_id}")
    elif spec.kind == "load_dictionary":
        spec.path = str(resolve_under(spec.path, settings.dictionary_roots, "spec.path"))
    memory = _memory_estimate(settings, spec, pairs)
    return pairs[0].pair_id, memory if memory is not None else max(p.estimated_memory_bytes for p in pairs)


def _check_control_options(session: Session, settings: Settings, options: Any, pairs: list[Pair]) -> None:
    """Closure's boundaries in range for every pair; its second descendant a registered pair, or a model
    directory under the model roots, with the pair's block count (the base itself is checked on load)."""
    field = "spec.control_options"
    for pair in pairs:
        _check_boundary(options.closure_boundaries, pair, f"{field}.closure_boundaries")
    ref = options.wrong_descendant
    if ref is None:
        return
    field += ".wrong_descendant"
    if len(pairs) > 1:
        raise Invalid(field, "a second descendant belongs to one base: give it for a one-pair job")
    if ref.pair_id is not None:
        n_layers = _check_pair(session, ref.pair_id, f"{field}.pair_id").n_layers
    else:
        from crosspatch.engine.admission import read_shape

        path = resolve_under(ref.path, settings.model_roots, f"{field}.path")
        if not (path / "config.json").is_file():
            raise Invalid(f"{field}.path", f"{path} is not a model directory (no config.json)")
        try:
            n_layers = read_shape(path).n_layers
        except Exception as e:  # a config.json that does not describe a decoder
            raise Invalid(f"{field}.path", f"not a model directory: {e}") from None
        ref.path = str(path)
    if n_layers != pairs[0].n_layers:
        raise Invalid(
            field,
            f"the second descendant has {n_layers} blocks, pair {pairs[0].pair_id!r} {pairs[0].n_layers}: "
            "it must be a descendant of the same base",
        )


STAGED_KINDS = ("divergence", "crosspatch")  # kinds a worker may run with one model resident


def _memory_estimate(settings: Settings, spec: Any, pairs: list[Pair]) -> int | None:
    """The job's peak bytes by the workers' estimator (engine.admission, config.json only): staged for a kind
    that may run staged, else lockstep. 422 when it cannot fit `device_memory_gb` even staged. None when a
    model has no local config.json (a hub id): the pair's own estimate stands."""
    from crosspatch.engine.admission import (
        MemoryAdmissionError,
        Workload,
        admit,
        read_shape,
        second_descendant_bytes,
    )
    from crosspatch.engine.pairs import DEVICE_MAPS

    staged = spec.kind in STAGED_KINDS and getattr(spec, "event", "first_diff") == "first_diff"
    staged = staged and not getattr(spec, "controls", None)
    prompts = getattr(spec, "prompts", None) or []
    longest = max((len(p.text.encode()) for p in prompts), default=0) + 2  # a token covers >= 1 byte
    boundary = getattr(spec, "boundary", None)
    budget = None
    if (
        settings.device_memory_gb is not None and settings.device not in DEVICE_MAPS
    ):  # GPUs counted by workers
        budget = int(settings.device_memory_gb * 1e9)
    need = 0
    for pair in pairs:
        try:
            shape = read_shape(model_ref_to_open(pair.pt, settings.model_roots, "pt"))
        except Exception:  # a hub id or a model not present here: no config.json to size it from
            return None
        n_boundaries = len(boundary) if isinstance(boundary, list) else 1
        n_boundaries = -1 if boundary == "sweep" else n_boundaries  # < 0: every boundary
        work = Workload(
            getattr(spec, "batch_size", 1), longest, getattr(spec, "max_new_tokens", 0), n_boundaries
        )
        try:
            mode, est = admit(shape, work, settings.dtype, budget)
        except MemoryAdmissionError as e:
            raise Invalid("spec", f"pair {pair.pair_id!r}: {e}") from None
        if mode == "staged" and not staged:
            raise Invalid(
                "spec",
                f"pair {pair.pair_id!r}: a {spec.kind} job needs both models resident, which does not fit the "
                f"budget of {settings.device_memory_gb} GB per device: {est.describe()}; only divergence and "
                "crosspatch jobs on first_diff events without controls run staged (one model resident)",
            )
        # closure's wrong-descendant control keeps a third model (the second descendant) resident
        extra = second_descendant_bytes(est) if _holds_second_descendant(spec) else 0
        if extra and budget is not None and est.lockstep + extra > budget:
            raise Invalid(
                "spec.control_options.wrong_descendant",
                f"pair {pair.pair_id!r}: three models resident (PT, IT, the second descendant) need about "
                f"{(est.lockstep + extra) / 1e9:.1f} GB, over the budget of {settings.device_memory_gb} GB per device",
            )
        need = max(need, (est.staged if staged else est.lockstep) + extra)
    return need


def _holds_second_descendant(spec: Any) -> bool:
    """Whether the job loads closure's second descendant beside its pair (a third resident model)."""
    options = getattr(spec, "control_options", None)
    controls = getattr(spec, "controls", None) or []
    return "closure" in controls and options is not None and options.wrong_descendant is not None


def _check_pretrained_allowed(settings: Settings, ref: str) -> None:
    """A pretrained SAE `RELEASE/SAE_ID` must match one of the server's allow-list patterns."""
    from fnmatch import fnmatchcase

    if not any(fnmatchcase(ref, pattern) for pattern in settings.pretrained_dictionaries):
        allowed = ", ".join(settings.pretrained_dictionaries) or "none"
        raise Invalid(
            "spec.sae_id",
            f"pretrained dictionary {ref!r} is not allow-listed on this server (allowed: {allowed}); "
            "an admin adds it to CROSSPATCH_PRETRAINED_DICTIONARIES",
        )


RESEARCHER_PRIORITIES = (-10, 0)


def _check_priority(priority: int, user: User) -> None:
    """Researchers order only their own jobs, within a band at or below the default; admins get all."""
    lo, hi = RESEARCHER_PRIORITIES
    if user.role != "admin" and not lo <= priority <= hi:
        raise Invalid(
            "priority",
            f"researchers may set priority {lo}..{hi} (it orders only their own jobs); got {priority}",
        )


def submit(session: Session, settings: Settings, user: User, body: JobCreate) -> Job:
    """Validate and enqueue one job (429 past the researcher's quota of active jobs)."""
    pair_id, memory = validate_spec(session, settings, body)
    _check_priority(body.priority, user)
    # Count and insert under one lock per owner, held to the end of this transaction: concurrent submits
    # of one researcher queue here instead of all counting before any inserts (PostgreSQL row lock;
    # SQLite's write transactions already begin with the write lock, BEGIN IMMEDIATE).
    session.execute(select(User.id).where(User.id == user.id).with_for_update())
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.owner_id == user.id, Job.status.in_(ACTIVE_STATUSES))
    )
    if (active or 0) >= settings.max_active_jobs_per_user:
        raise QuotaExceeded(
            f"you have {active} queued or running jobs; the limit is {settings.max_active_jobs_per_user}. "
            "Wait for some to finish or cancel them."
        )
    job = Job(
        owner_id=user.id,
        kind=body.spec.kind,
        spec=body.spec.model_dump(mode="json"),
        status="queued",
        priority=body.priority,
        share=body.share,
        pair_id=pair_id,
        estimated_memory_bytes=memory,
        progress={"fraction": 0.0, "message": "queued"},
    )
    session.add(job)
    session.flush()
    session.add(JobLog(job_id=job.id, message=f"submitted by {user.name}"))
    return job


def may_see_private(job: Job, user: User, settings: Settings) -> bool:
    """Whether `user` may read `job`'s spec (inline prompts), logs and provenance."""
    return settings.job_visibility == "lab" or job.owner_id == user.id or user.role == "admin"


def to_public(session: Session, job: Job, viewer: User, settings: Settings) -> JobPublic:
    """The job as `viewer` may see it (spec redacted to its kind when private to someone else)."""
    owner = session.get(User, job.owner_id)
    return JobPublic.model_validate({**_fields(job, viewer, settings), "owner": owner.name if owner else "?"})


def _fields(job: Job, viewer: User, settings: Settings) -> dict[str, Any]:
    fields = {c: getattr(job, c) for c in JobPublic.model_fields if c not in ("owner", "spec")}
    fields["spec"] = (
        job.spec if may_see_private(job, viewer, settings) else {"kind": job.kind, "redacted": True}
    )
    return fields


def list_jobs(
    session: Session,
    user: User,
    settings: Settings,
    *,
    mine: bool,
    status: str | None,
    limit: int,
    offset: int,
) -> tuple[list[JobPublic], int]:
    """Jobs, newest first; everyone may list all jobs (others' specs redacted under owner visibility)."""
    where = []
    if mine:
        where.append(Job.owner_id == user.id)
    if status:
        where.append(Job.status == status)
    count = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    rows = session.execute(
        select(Job, User.name)
        .join(User, User.id == Job.owner_id)
        .where(*where)
        .order_by(Job.created_at.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return [
        JobPublic.model_validate({**_fields(j, user, settings), "owner": name}) for j, name in rows
    ], count


def _transition(
    session: Session, job_id: uuid.UUID, from_statuses: tuple[str, ...], conflict: str, **values: object
) -> Job:
    """Set `values` on the job, atomically, if its status is one of `from_statuses`; else 409 `conflict`
    (a format string given the job's {status})."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(from_statuses)).values(**values).returning(Job.id)
    ).first()
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    if result is None:
        raise Conflict(conflict.format(status=job.status))
    return job


def cancel(session: Session, job_id: uuid.UUID, user: User) -> Job:
    """Cancel an unfinished job (a running worker stops within a heartbeat); 409 if finished."""
    job = _transition(
        session,
        job_id,
        ACTIVE_STATUSES,
        f"job {job_id} is already {{status}}",
        status="cancelled",
        finished_at=utcnow(),
        lease_expires_at=None,
    )
    ops.end_attempt(session, job_id, "cancelled", f"cancelled by {user.name}")
    session.add(JobLog(job_id=job_id, message=f"cancelled by {user.name}"))
    return job


def retry(session: Session, job_id: uuid.UUID, user: User) -> Job:
    """Queue a failed or cancelled job again; it resumes from its finished parts."""
    job = _transition(
        session,
        job_id,
        ("failed", "cancelled"),
        f"only failed or cancelled jobs can be retried; job {job_id} is {{status}}",
        status="queued",
        error=None,
        finished_at=None,
        losses=0,  # attempts (and their history in job_attempts) are kept
        worker_id=None,
        progress={"fraction": 0.0, "message": "queued (retry)"},
    )
    session.add(JobLog(job_id=job_id, message=f"retried by {user.name}"))
    return job


def delete(session: Session, settings: Settings, results: ResultsStore, job_id: uuid.UUID) -> None:
    """Delete a finished job: its rows in the job store and DuckDB, and its parts on disk."""
    job = session.get(Job, job_id)
    assert job is not None
    if job.status not in TERMINAL_STATUSES:
        raise Conflict(f"job {job_id} is {job.status}; cancel it before deleting it")
    results.delete_job(str(job_id))
    session.execute(JobPart.__table__.delete().where(JobPart.job_id == job_id))
    session.execute(JobLog.__table__.delete().where(JobLog.job_id == job_id))
    session.delete(job)
    shutil.rmtree(parts_dir(settings.data_dir, job_id), ignore_errors=True)


def logs(session: Session, job_id: uuid.UUID, *, limit: int, offset: int) -> tuple[list[JobLog], int]:
    count = session.scalar(select(func.count()).select_from(JobLog).where(JobLog.job_id == job_id)) or 0
    rows = session.scalars(
        select(JobLog).where(JobLog.job_id == job_id).order_by(JobLog.id).limit(limit).offset(offset)
    )
    return list(rows), count
