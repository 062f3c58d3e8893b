"""POST /merges, /evaluations, /sweeps: the unified merge config as JSON; 202 + Location."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Response

from app.api.deps import ReadyDep
from app.api.errors import problem_responses
from app.api.schemas import EVALUATION_EXAMPLE, MERGE_EXAMPLE, SWEEP_EXAMPLE, JobRead
from app.db import JobKind
from app.submit import submit
from merging_core.config import MergeConfig

router = APIRouter(tags=["jobs"])
REPLAYED = "Idempotent-Replayed"
# A replay answers like the first call (202, the same job): a client that retries after a lost
# answer needs no second success path; the header tells a replay apart.
RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "Queued (or, for a repeated Idempotency-Key, the job the first call "
                       "queued); follow it at Location",
        "headers": {
            "Location": {"description": "the job: /jobs/{id}", "required": True,
                         "schema": {"type": "string"}},
            REPLAYED: {"description": "`true` when an earlier request with this Idempotency-Key "
                                      "created the job", "schema": {"type": "string", "enum": ["true"]}},
        },
    },
    **problem_responses(401, 403, 413, 422, 429, 503),
}
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=200,
           description="repeat a request safely: the same key returns the same job"),
]


def _accepted(response: Response, service: Any, kind: JobKind, config: MergeConfig,
              key: str | None) -> JobRead:
    job, created = submit(service, kind, config, key)
    response.headers["Location"] = f"/jobs/{job.id}"
    if not created:
        response.headers[REPLAYED] = "true"
    return JobRead.of(job)


@router.post("/merges", status_code=202, response_model=JobRead, operation_id="create_merge",
             summary="Queue a merge (evaluated too when eval_tasks is set)", responses=RESPONSES)
def create_merge(
    response: Response, service: ReadyDep,
    config: Annotated[MergeConfig, Body(openapi_examples={"ties": {"value": MERGE_EXAMPLE}})],
    idempotency_key: IdempotencyKey = None,
) -> JobRead:
    return _accepted(response, service, JobKind.MERGE, config, idempotency_key)


@router.post("/evaluations", status_code=202, response_model=JobRead,
             operation_id="create_evaluation", summary="Queue an in-memory merge evaluation",
             responses=RESPONSES)
def create_evaluation(
    response: Response, service: ReadyDep,
    config: Annotated[MergeConfig, Body(openapi_examples={"weighted_delta": {"value": EVALUATION_EXAMPLE}})],
    idempotency_key: IdempotencyKey = None,
) -> JobRead:
    return _accepted(response, service, JobKind.EVALUATE, config, idempotency_key)


@router.post("/sweeps", status_code=202, response_model=JobRead, operation_id="create_sweep",
             summary="Queue a grid or Bayesian sweep", responses=RESPONSES)
def create_sweep(
    response: Response, service: ReadyDep,
    config: Annotated[MergeConfig, Body(openapi_examples={"bayes": {"value": SWEEP_EXAMPLE}})],
    idempotency_key: IdempotencyKey = None,
) -> JobRead:
    return _accepted(response, service, JobKind.SWEEP, config, idempotency_key)
