"""Jobs: list, read, cancel, and follow with server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from sse_starlette.sse import EventSourceResponse

from app import crud
from app.api.deps import DbDep, ReadDbDep, ServiceDep
from app.api.errors import problem_responses
from app.api.schemas import JobPage, JobRead
from app.db import TERMINAL, JobKind, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])
POLL_S = 0.5


@router.get("", response_model=JobPage, operation_id="list_jobs", summary="List jobs, newest first",
            responses=problem_responses(401, 403, 422))
def list_jobs(
    db: ReadDbDep,
    kind: JobKind | None = None,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    page_token: Annotated[str | None, Query(
        pattern=crud.PAGE_TOKEN_PATTERN, max_length=100,
        description="a previous page's next_page_token: `<microseconds>-<job id>`, a position "
        "in the newest-first order (jobs created before it come next)")] = None,
) -> JobPage:
    jobs, token = crud.list_jobs(db, kind=kind, status=status, limit=limit, page_token=page_token)
    return JobPage(jobs=[JobRead.of(j) for j in jobs], next_page_token=token)


@router.get("/{job_id}", response_model=JobRead, operation_id="get_job",
            summary="Status, progress, timestamps, result and error of a job",
            responses=problem_responses(401, 403, 404, 422))
def get_job(job_id: str, db: ReadDbDep) -> JobRead:
    return JobRead.of(crud.get_job(db, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobRead, operation_id="cancel_job",
             summary="Cancel: a queued job at once, a running one at its next batch or trial",
             responses=problem_responses(401, 403, 404, 409, 422))
def cancel_job(job_id: str, db: DbDep, service: ServiceDep) -> JobRead:
    job = crud.request_cancel(db, job_id=job_id)
    if job.status == JobStatus.RUNNING.value:
        service.executor.cancel(job_id)
    return JobRead.of(job)


@router.get("/{job_id}/events", operation_id="job_events",
            summary="Server-sent events: `progress` and `status` until the job ends",
            responses={200: {"content": {"text/event-stream": {}}, "description": "event stream"},
                       **problem_responses(401, 403, 404, 422)})
async def job_events(job_id: str, request: Request, service: ServiceDep) -> EventSourceResponse:
    def read() -> JobRead:
        with service.db_read() as db:
            return JobRead.of(crud.get_job(db, job_id=job_id))

    first = await asyncio.to_thread(read)  # 404 before the stream starts

    async def stream() -> AsyncIterator[dict[str, str]]:
        job, last_status, last_progress = first, None, None
        while True:
            if job.status != last_status:
                last_status = job.status
                yield {"event": "status", "data": json.dumps({"id": job.id, "status": job.status.value})}
            progress = job.progress.model_dump_json()
            if progress != last_progress:
                last_progress = progress
                yield {"event": "progress", "data": progress}
            if job.status in TERMINAL:
                yield {"event": "end", "data": job.model_dump_json(include={"id", "status", "result", "error"})}
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL_S)
            job = await asyncio.to_thread(read)

    return EventSourceResponse(stream())
