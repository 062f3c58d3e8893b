"""Request and response schemas (request bodies are merging_core's MergeConfig)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.db import JobKind, JobStatus
from app.db import Job

MERGE_EXAMPLE = {
    "adapters": ["intent", "banking", "sentiment"],
    "method": "ties",
    "method_params": {"k": 20, "lambda": 1.0},
    "eval_tasks": ["intent", "banking", "sentiment"],
    "save_merged": True,
}
EVALUATION_EXAMPLE = {
    "adapters": ["intent", "sentiment"],
    "method": "weighted_delta",
    "method_params": {"lambda": 0.6},
    "eval_tasks": ["intent", "sentiment"],
    "eval_subset": {"max_samples": 200, "stratified": True},
}
SWEEP_EXAMPLE = {
    "adapters": ["intent", "sentiment"],
    "method": "weighted_delta",
    "eval_subset": {"max_samples": 200, "stratified": True, "seed": 0},
    "search": {"type": "bayes", "budget": 8, "init_points": 4, "seed": 0,
               "space": {"lambda": {"type": "float", "min": 0.0, "max": 1.0}}},
}


class Progress(BaseModel):
    done: int = Field(examples=[3])
    total: int = Field(examples=[8])
    message: str = Field(examples=["trial 2 objective -0.0150"])
    best: dict[str, Any] | None = Field(
        default=None, description="current best of a sweep: index (the trial), objective, point"
    )


class Timestamps(BaseModel):
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobError(BaseModel):
    type: str = Field(examples=["IncompatibleAdaptersError"])
    status: int = Field(examples=[422])
    detail: str


class JobRead(BaseModel):
    id: str = Field(examples=["3f2a9c1d0e..."])
    kind: JobKind
    status: JobStatus
    progress: Progress
    timestamps: Timestamps
    run_dir: str | None = None
    run_id: str | None = Field(default=None, description="the run bundle a finished merge wrote "
                               "(GET /runs/{run_id}); null for other jobs and before the end")
    sweep_id: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    request: dict[str, Any]
    result: dict[str, Any] | None = None
    error: JobError | None = None

    @classmethod
    def of(cls, job: Job) -> JobRead:
        return cls(
            id=job.id, kind=JobKind(job.kind), status=JobStatus(job.status),
            progress=Progress(done=job.progress_done, total=job.progress_total,
                              message=job.progress_message, best=job.progress_best),
            timestamps=Timestamps(created_at=job.created_at, started_at=job.started_at,
                                  finished_at=job.finished_at, updated_at=job.updated_at),
            run_dir=job.run_dir, run_id=(job.result or {}).get("run_id"), sweep_id=job.sweep_id,
            cancel_requested=job.cancel_requested,
            attempts=job.attempts, request=job.request, result=job.result,
            error=JobError(**job.error) if job.error else None,
        )


class JobPage(BaseModel):
    jobs: list[JobRead]
    next_page_token: str | None = Field(default=None, description="pass as page_token for more")


class TrialRead(BaseModel):
    index: int
    point: dict[str, Any]
    source: str
    objective: float
    metrics: dict[str, float]
    interference_delta: dict[str, float]
    merge_tag: str
    fidelity: int | None = Field(default=None, description="eval subset size it was scored at; null: full split")
    worker: str | None = Field(default=None, description="the worker that ran it; null: the embedded one")


class TrialPage(BaseModel):
    job_id: str
    sweep_id: str | None
    trials: list[TrialRead]
    best: TrialRead | None


class EvaluationRead(BaseModel):
    id: str
    method: str
    merge_tag: str
    adapters: list[str]
    params: dict[str, Any]
    split: str
    subset: str | None
    metrics: dict[str, float]
    interference_delta: dict[str, float]
    objective_min_delta: float
    run_id: str | None = None
    sweep_id: str | None = None
    trial: int | None = None
    job_id: str | None = None
    created_at: str
    results_file: str


class EvaluationPage(BaseModel):
    total: int
    items: list[EvaluationRead]


class MethodParam(BaseModel):
    name: str
    kind: str
    required: bool
    doc: str
    param_schema: dict[str, Any] = Field(alias="schema")
    default: Any = None


class MethodRead(BaseModel):
    name: str
    doc: str
    paper: str
    space: str
    linear: bool
    saveable: bool
    min_adapters: int
    max_adapters: int | None
    required_params: list[str]
    params_defaults: dict[str, Any]
    params: list[MethodParam]


class TaskRead(BaseModel):
    name: str
    evaluator: str
    primary_metric: str
    splits: list[str]
    adapter: str
    reference: dict[str, Any] = Field(
        default_factory=dict, description="split -> the task adapter's own metrics, once computed"
    )


class RunRead(BaseModel):
    run_id: str
    run_dir: str
    metadata: dict[str, Any]
    summary: dict[str, Any] | None
    eval_results: dict[str, Any] = Field(default_factory=dict)
    adapter_url: str | None = Field(default=None, description="zip download of the saved adapter")


class ActorHealth(BaseModel):
    """One model actor of the Ray executor."""

    name: str = Field(examples=["actor-0"])
    resident: bool = Field(description="its base model is loaded")
    busy: bool = Field(description="a job's merge, evaluation or trial is running on it")
    device: str | None = None
    pid: int | None = None
    node: str | None = None


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    ready: bool
    device: str | None
    model: str | None
    workspace: str
    error: str | None = None
    executor: str = Field(default="embedded", examples=["embedded"], description="embedded or ray")
    actors: list[ActorHealth] | None = Field(
        default=None, description="the Ray executor's model actors (null with the embedded executor)")
