"""Sweep trials and plots (by the sweep's job id)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app import crud
from app.api.deps import ReadDbDep
from app.api.errors import problem_responses
from app.api.schemas import TrialPage, TrialRead
from app.db import JobKind
from app.errors import NotFound

router = APIRouter(prefix="/sweeps", tags=["sweeps"])


def _sweep_job(db: ReadDbDep, job_id: str):  # type: ignore[no-untyped-def]
    job = crud.get_job(db, job_id=job_id)
    if job.kind != JobKind.SWEEP.value:
        raise NotFound(f"job {job_id} is a {job.kind} job, not a sweep")
    return job


@router.get("/{job_id}/trials", response_model=TrialPage, operation_id="list_sweep_trials",
            summary="Trials of a sweep so far, in order, with the best",
            responses=problem_responses(401, 403, 404, 422))
def list_trials(job_id: str, db: ReadDbDep) -> TrialPage:
    job = _sweep_job(db, job_id)
    trials = [
        TrialRead(index=t.trial_index, point=t.point, source=t.source, objective=t.objective,
                  metrics=t.metrics, interference_delta=t.interference_delta, merge_tag=t.merge_tag,
                  fidelity=t.fidelity, worker=t.worker)
        for t in (crud.list_trials(db, sweep_id=job.sweep_id) if job.sweep_id else [])
    ]
    best = max(trials, key=lambda t: t.objective) if trials else None
    return TrialPage(job_id=job.id, sweep_id=job.sweep_id, trials=trials, best=best)


@router.get("/{job_id}/plot.png", operation_id="get_sweep_plot", summary="The sweep's plot",
            response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "PNG"},
                       **problem_responses(401, 403, 404, 422)})
def get_plot(job_id: str, db: ReadDbDep) -> FileResponse:
    job = _sweep_job(db, job_id)
    plot = (job.result or {}).get("plot")
    if not plot or not Path(plot).is_file():
        raise NotFound(f"sweep job {job_id} has no plot yet (status {job.status})")
    return FileResponse(plot, media_type="image/png")
