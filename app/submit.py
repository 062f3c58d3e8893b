"""Validate a job request completely by planning it, then queue the job with its plan (or return
the job an Idempotency-Key names).

Paths in a request (adapter directories, warm-start sweeps) must lie inside the allowed roots;
they are resolved (following `..` and symlinks) and checked before anything is opened.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app import crud
from app.db import Job, JobKind
from app.errors import Forbidden, InvalidRequest, QueueFull
from app.service import Service
from app.worker import plan_job
from merging_core.config import MergeConfig


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _resolved(path: Path, field: str, given: str) -> Path:
    """`path` with `~` expanded and links followed; a path that cannot name a file is a 422
    (an unknown `~user`, a NUL byte), never a crash."""
    try:
        return path.expanduser().resolve()
    except (RuntimeError, ValueError, OSError) as exc:
        raise InvalidRequest(f"{field}: {given!r} is not a usable path ({exc})") from None


def check_paths(service: Service, config: MergeConfig) -> None:
    roots = service.settings.adapter_roots()
    tasks = service.workspace.tasks
    for adapter in config.adapters:
        if adapter in tasks:
            continue
        if not any(sep in adapter for sep in ("/", "\\")) and not adapter.startswith(("~", ".")):
            # A bare name is meant as a task; a directory in the server's working directory
            # would be written "./name".
            raise InvalidRequest(
                f"adapters: {adapter!r} is not a task of workspace {service.workspace.name!r} "
                f"(tasks: {', '.join(sorted(tasks))}); give an adapter directory as a path"
            )
        resolved = _resolved(Path(adapter), "adapters", adapter)
        if not _inside(resolved, roots):
            raise Forbidden(
                f"adapter path {adapter!r} resolves to {resolved}, outside the allowed roots "
                f"({', '.join(map(str, roots))}); it was not opened"
            )
    if config.output_dir is not None:
        raise InvalidRequest("output_dir: the service writes to its own artifacts directory; omit it")
    for source in config.search.warm_start_sweeps if config.search else []:
        prefix = source.split("*")[0].split("?")[0].split("[")[0]
        resolved = _resolved(service.artifacts_dir / prefix, "search.warm_start_sweeps", source)
        if not _inside(resolved, roots):
            raise Forbidden(f"warm_start_sweeps entry {source!r} is outside the allowed roots")


def request_body(config: MergeConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude_unset=True)


def _replayed(db: Session, idempotency_key: str | None, digest: str) -> Job | None:
    """The job an Idempotency-Key already names (422 if it was for a different request)."""
    if not idempotency_key:
        return None
    existing = crud.find_job_by_idempotency_key(db, key=idempotency_key)
    if existing is not None and existing.request_hash != digest:
        raise InvalidRequest(f"Idempotency-Key {idempotency_key!r} was used for a different request")
    return existing


def submit(service: Service, kind: JobKind, config: MergeConfig, idempotency_key: str | None) -> tuple[Job, bool]:
    """Return (job, created). A repeated Idempotency-Key returns its job, or 422 if the body differs."""
    body = request_body(config)
    idempotency_key = idempotency_key or None  # an empty key is no key (never stored as one)
    digest = hashlib.sha256(json.dumps([kind.value, body], sort_keys=True).encode()).hexdigest()
    with service.db_read() as db:
        existing = _replayed(db, idempotency_key, digest)
    if existing is not None:
        return existing, False
    check_paths(service, config)
    # Everything a worker would refuse is refused here (422 naming the problem), by planning:
    # the plan loads and checks the adapters but computes nothing and touches no model.
    plan = plan_job(kind, config, service.workspace, service.adapter_cache)
    with service.db() as db:  # BEGIN IMMEDIATE: the check below and the insert are one step
        existing = _replayed(db, idempotency_key, digest)  # a concurrent twin got there first
        if existing is not None:
            return existing, False
        if crud.count_queued(db) >= service.settings.max_queued_jobs:
            raise QueueFull(f"{service.settings.max_queued_jobs} jobs are already queued; retry later")
        job, created = crud.create_job(db, kind=kind, request=body, request_hash=digest,
                                       idempotency_key=idempotency_key)
    if not created:  # the key's unique constraint met a concurrent twin: its job is the one
        if job.request_hash != digest:
            raise InvalidRequest(f"Idempotency-Key {idempotency_key!r} was used for a different request")
        return job, False
    service.executor.submit(job.id, plan)
    return job, True
