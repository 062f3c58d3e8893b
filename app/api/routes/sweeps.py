"""Sweep trials and plots (by the sweep's job id)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from app import crud
from app.api.deps import ReadDbDep
from app.api.errors import problem_responses
from app.api.openapi import binary_content, binary_media_type
from app.api.schemas import TrialPage, TrialRead
from app.db import TERMINAL, JobKind, JobStatus
from app.errors import Conflict, NotFound
from merging_core.search.plot import sweep_plot_png
from merging_core.search.trials import Trial, ranked_trials

router = APIRouter(prefix="/sweeps", tags=["sweeps"])

PLOT_STATE = "Sweep-Plot"
PLOT_TRIALS = "Sweep-Trials"
# How long a client waits before asking again for the plot of a sweep with no trial yet.
NO_TRIAL_RETRY_S = 2
PNG = "image/png"


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


def _top_fidelity(request: dict[str, Any]) -> int | None:
    """The fidelity that ranks a multi-fidelity sweep (None: every trial ranks); the stored
    request was validated when the job was queued."""
    fidelities = ((request.get("search") or {}).get("multi_fidelity") or {}).get("fidelities")
    return int(fidelities[-1]) if fidelities else None


_PLOT_HEADERS = {
    PLOT_STATE: {"description": "`complete`: the finished sweep's plot; `partial`: drawn from "
                                "the trials so far (the sweep is running or ended early)",
                 "required": True, "schema": {"type": "string", "enum": ["complete", "partial"]}},
    PLOT_TRIALS: {"description": "how many trials the plot draws (a partial plot)",
                  "schema": {"type": "integer", "minimum": 1}},
}


@router.get(
    "/{job_id}/plot.png", operation_id="get_sweep_plot", response_class=Response,
    summary="The sweep's plot: the finished one, or one drawn from the trials so far",
    responses={
        200: {"content": binary_content(PNG), "description": "PNG", "headers": _PLOT_HEADERS},
        409: {**problem_responses(409)[409], "description": "The sweep has no trial yet; retry "
              "after Retry-After seconds",
              "headers": {"Retry-After": {"description": "seconds", "required": True,
                                          "schema": {"type": "integer", "minimum": 1}}}},
        **problem_responses(401, 403, 404, 422),
    },
)
def get_plot(job_id: str, db: ReadDbDep, request: Request) -> Response:
    job = _sweep_job(db, job_id)
    media_type = binary_media_type(request.headers.get("accept"), PNG)
    plot = (job.result or {}).get("plot")
    if plot and Path(plot).is_file():
        return FileResponse(plot, media_type=media_type, headers={PLOT_STATE: "complete"})
    rows = crud.list_trials(db, sweep_id=job.sweep_id) if job.sweep_id else []
    if not rows:
        if JobStatus(job.status) in TERMINAL:
            raise NotFound(f"sweep job {job_id} ended ({job.status}) without a trial: no plot")
        raise Conflict(f"sweep job {job_id} has no trial yet (status {job.status}); retry shortly",
                       retry_after=NO_TRIAL_RETRY_S)
    trials = [Trial(index=t.trial_index, point=t.point, source=t.source, objective=t.objective,
                    metrics=t.metrics, interference_delta=t.interference_delta, method_params={},
                    lambda_policy={}, merge_tag=t.merge_tag, eval_id="", duration_s=0.0,
                    fidelity=t.fidelity, worker=t.worker) for t in rows]
    ranked = ranked_trials(trials, _top_fidelity(job.request)) or trials
    tasks = sorted(ranked[0].interference_delta)
    finished = job.status == JobStatus.SUCCEEDED.value
    png = sweep_plot_png(ranked, tasks, title=None if finished else
                         f"sweep: max-min interference (partial: {len(ranked)} trials, {job.status})")
    return Response(png, media_type=media_type,
                    headers={PLOT_STATE: "complete" if finished else "partial",
                             PLOT_TRIALS: str(len(ranked))})
