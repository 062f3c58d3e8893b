"""Data access: keyword-only verb functions over the typed models. No queries in routes."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import (
    ALLOWED_TRANSITIONS,
    IDEMPOTENCY_LOCK,
    QUEUE_LOCK,
    TERMINAL,
    EvalEntry,
    EvalTaskResult,
    Job,
    JobKind,
    JobStatus,
    SweepTrial,
    advisory_xact_lock,
    utcnow,
)
from app.errors import Conflict, InvalidRequest, NotFound
from merging_core.runtime.index import read_index
from merging_core.runtime.paths import index_files


# --- jobs ------------------------------------------------------------------------------------


def create_job(
    session: Session, *, kind: JobKind, request: dict[str, Any], request_hash: str,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """Insert a queued job; returns (job, True). If a concurrent first use of the same
    Idempotency-Key committed first, returns (that job, False) instead."""
    job = Job(
        id=uuid.uuid4().hex, kind=kind.value, status=JobStatus.QUEUED.value, request=request,
        request_hash=request_hash, idempotency_key=idempotency_key,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # Postgres: a concurrent first use of the same key committed between the caller's look-up
        # and this insert (the key's unique constraint refused this one). Callers that look the
        # key up with find_job_by_idempotency_key in the same transaction hold its lock, so
        # seldom get here.
        session.rollback()
        existing = find_job_by_idempotency_key(session, key=idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return existing, False
    return job, True


def get_job(session: Session, *, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


def find_job_by_idempotency_key(session: Session, *, key: str) -> Job | None:
    """The job an Idempotency-Key names. On Postgres the key is locked until the transaction
    ends, so a concurrent first use of it waits for this one's insert and then finds its job
    (on SQLite the write transaction's `BEGIN IMMEDIATE` serializes them already)."""
    advisory_xact_lock(session, IDEMPOTENCY_LOCK, key)
    return session.scalars(select(Job).where(Job.idempotency_key == key)).first()


def count_queued(session: Session) -> int:
    """Queued jobs. On Postgres the count is locked until the transaction ends, so a count and
    the insert that follows it are one step (on SQLite `BEGIN IMMEDIATE` makes them one)."""
    advisory_xact_lock(session, QUEUE_LOCK)
    return int(session.scalar(select(func.count()).select_from(Job).where(
        Job.status == JobStatus.QUEUED.value)) or 0)


# A page token is a position in the newest-first order: `<created_at, microseconds since the
# epoch>-<job id>`. Every string of that form (PAGE_TOKEN_PATTERN, which the API documents) is a
# valid position, so the schema and the behaviour agree: a token this service did not issue
# still means "the jobs after this point", and anything else fails the pattern (422).
PAGE_TOKEN_PATTERN = r"^[0-9]{1,17}-[0-9a-f]{1,64}$"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _encode_token(job: Job) -> str:
    created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=timezone.utc)
    return f"{(created - _EPOCH) // timedelta(microseconds=1)}-{job.id}"


def _decode_token(token: str) -> tuple[datetime, str]:
    if not re.fullmatch(PAGE_TOKEN_PATTERN, token):
        raise InvalidRequest(f"page_token {token[:80]!r} is not of the form <microseconds>-<job id>")
    micros, job_id = token.split("-", 1)
    return _EPOCH + timedelta(microseconds=int(micros)), job_id


def list_jobs(
    session: Session, *, kind: JobKind | None, status: JobStatus | None, limit: int,
    page_token: str | None,
) -> tuple[list[Job], str | None]:
    """Newest first; `page_token` continues after the last job of the previous page."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc())
    if kind is not None:
        query = query.where(Job.kind == kind.value)
    if status is not None:
        query = query.where(Job.status == status.value)
    if page_token:
        created, job_id = _decode_token(page_token)
        query = query.where(
            (Job.created_at < created) | ((Job.created_at == created) & (Job.id < job_id))
        )
    jobs = list(session.scalars(query.limit(limit + 1)))
    next_token = _encode_token(jobs[limit - 1]) if len(jobs) > limit else None
    return jobs[:limit], next_token


def transition(session: Session, *, job_id: str, status: JobStatus, **fields: Any) -> Job:
    """The one place where a job's status changes (checked against the allowed transitions)."""
    job = get_job(session, job_id=job_id)
    current = JobStatus(job.status)
    if status not in ALLOWED_TRANSITIONS.get(current, set()):
        raise Conflict(f"job {job_id} is {current.value}; it cannot become {status.value}")
    job.status = status.value
    now = utcnow()
    if status is JobStatus.RUNNING:
        job.started_at = now
        job.attempts += 1
    if status in TERMINAL:
        job.finished_at = now
    if status is JobStatus.QUEUED:
        job.started_at = None
    for name, value in fields.items():
        setattr(job, name, value)
    job.updated_at = now
    session.commit()
    return job


def update_progress(
    session: Session, *, job_id: str, done: int, total: int, message: str,
    best: dict[str, Any] | None = None, **fields: Any,
) -> None:
    job = get_job(session, job_id=job_id)
    job.progress_done, job.progress_total, job.progress_message = done, total, message[:500]
    if best is not None:
        job.progress_best = best
    for name, value in fields.items():
        setattr(job, name, value)
    job.updated_at = utcnow()
    session.commit()


def request_cancel(session: Session, *, job_id: str) -> Job:
    job = get_job(session, job_id=job_id)
    if JobStatus(job.status) in TERMINAL:
        raise Conflict(f"job {job_id} already {job.status}; only queued or running jobs can be cancelled")
    if job.status == JobStatus.QUEUED.value:
        return transition(session, job_id=job_id, status=JobStatus.CANCELLED,
                          cancel_requested=True, progress_message="cancelled before it started")
    job.cancel_requested = True
    job.updated_at = utcnow()
    session.commit()
    return job


def interrupted_jobs(session: Session) -> list[Job]:
    """Jobs a dead process left `running`, to re-queue at start-up."""
    return list(session.scalars(select(Job).where(Job.status == JobStatus.RUNNING.value)))


def queued_jobs(session: Session, *, limit: int | None = None) -> list[Job]:
    """Queued jobs, oldest first."""
    query = select(Job).where(Job.status == JobStatus.QUEUED.value).order_by(Job.created_at, Job.id)
    return list(session.scalars(query.limit(limit) if limit else query))


# --- sweep trials ----------------------------------------------------------------------------


def record_trial(session: Session, *, job_id: str, sweep_id: str, trial: dict[str, Any]) -> None:
    exists = session.scalars(select(SweepTrial).where(
        SweepTrial.sweep_id == sweep_id, SweepTrial.trial_index == trial["index"])).first()
    if exists is not None:
        return
    session.add(SweepTrial(
        job_id=job_id, sweep_id=sweep_id, trial_index=trial["index"], point=trial["point"],
        source=trial["source"], objective=trial["objective"], metrics=trial["metrics"],
        interference_delta=trial["interference_delta"], merge_tag=trial["merge_tag"],
        fidelity=trial.get("fidelity"), worker=trial.get("worker"),
    ))
    session.commit()


def list_trials(session: Session, *, sweep_id: str) -> list[SweepTrial]:
    return list(session.scalars(
        select(SweepTrial).where(SweepTrial.sweep_id == sweep_id).order_by(SweepTrial.trial_index)))


# --- eval index mirror -----------------------------------------------------------------------


def mirror_index_entry(session: Session, *, index_path: Path, entry: dict[str, Any]) -> bool:
    """Insert one `eval/index.json` entry (a no-op if its id is already mirrored)."""
    if session.get(EvalEntry, entry["id"]) is not None:
        return False
    _add_entry(session, index_path, entry)
    session.commit()
    return True


def _add_entry(session: Session, index_path: Path, entry: dict[str, Any]) -> None:
    session.add(EvalEntry(
        id=entry["id"], index_path=str(index_path), method=entry["method"],
        merge_tag=entry["merge_tag"], adapters=entry["adapters"], params=entry.get("params", {}),
        split=entry["split"], subset=entry.get("subset"),
        objective_min_delta=entry["objective_min_delta"], run_id=entry.get("run_id"),
        sweep_id=entry.get("sweep_id"), created_at=entry.get("created_at", ""), entry=entry,
    ))
    for task, metric in entry.get("metrics", {}).items():
        session.add(EvalTaskResult(entry_id=entry["id"], task=task, metric=metric,
                                   interference_delta=entry["interference_delta"][task]))


def reindex(session: Session, *, artifacts_dir: Path) -> int:
    """Rebuild the mirror from every `eval/index.json` on disk (the source of truth), in one
    transaction: a concurrent reader sees the old mirror or the new one, never an empty one."""
    session.execute(delete(EvalTaskResult))
    session.execute(delete(EvalEntry))
    seen: set[str] = set()
    for index_path in index_files(artifacts_dir):
        for entry in read_index(index_path):
            if entry["id"] not in seen:
                seen.add(entry["id"])
                _add_entry(session, index_path, entry)
    session.commit()
    return len(seen)


EVAL_SORTS = ("created_at", "objective", "metric", "interference")


def query_evaluations(
    session: Session, *, method: str | None, task: str | None, split: str | None,
    tag: str | None, subset: str | None, sort: str, descending: bool, limit: int, offset: int,
) -> tuple[list[EvalEntry], int]:
    if sort in ("metric", "interference") and not task:
        raise InvalidRequest(f"sort={sort} needs a task (the metric of which task?)")
    query = select(EvalEntry)
    if task:
        query = query.join(EvalTaskResult, EvalTaskResult.entry_id == EvalEntry.id).where(
            EvalTaskResult.task == task)
    if method:
        query = query.where(EvalEntry.method == method)
    if split:
        query = query.where(EvalEntry.split == split)
    if tag:
        query = query.where(EvalEntry.merge_tag == tag)
    if subset is not None:
        query = query.where(EvalEntry.subset == subset) if subset else query.where(EvalEntry.subset.is_(None))
    column = {
        "created_at": EvalEntry.created_at,
        "objective": EvalEntry.objective_min_delta,
        "metric": EvalTaskResult.metric,
        "interference": EvalTaskResult.interference_delta,
    }[sort]
    total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    ordered = query.order_by(column.desc() if descending else column.asc(), EvalEntry.id)
    return list(session.scalars(ordered.offset(offset).limit(limit))), total
