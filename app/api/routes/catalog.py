"""Read-only catalogue: methods (from the registry), tasks, evaluations (SQLite mirror), runs."""

from __future__ import annotations

import io
import re
import json
import zipfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app import crud
from app.api.deps import ReadDbDep, ServiceDep
from app.api.errors import problem_responses
from app.api.openapi import binary_content, binary_media_type
from app.api.schemas import EvaluationPage, EvaluationRead, MethodRead, RunRead, TaskRead
from app.errors import Conflict, NotFound
from merging_core.adapters.loading import CONFIG_FILE, WEIGHTS_FILE
from merging_core.engine import list_methods
from merging_core.runtime.paths import (
    RUN_ID_PATTERN,
    RUN_METADATA_FILE,
    RUN_SUMMARY_FILE,
    cached_metrics_file,
    find_run_dirs,
    head_files,
    run_eval_results_files,
)

router = APIRouter(tags=["catalogue"])
ZIP = "application/zip"


@router.get("/methods", response_model=list[MethodRead], operation_id="list_methods",
            summary="Every merge method with its parameter schema", responses=problem_responses(401, 403))
def methods() -> list[MethodRead]:
    return [MethodRead.model_validate(m.describe()) for m in list_methods()]


@router.get("/tasks", response_model=list[TaskRead], operation_id="list_tasks",
            summary="The workspace's tasks, with reference metrics once computed",
            responses=problem_responses(401, 403))
def tasks(service: ServiceDep) -> list[TaskRead]:
    items = []
    for name, task in service.workspace.tasks.items():
        reference = {}
        for split in task.data:
            cached = cached_metrics_file(service.artifacts_dir, name, split, None, "reference")
            if cached.is_file():
                reference[split] = json.loads(cached.read_text())["metrics"]
        items.append(TaskRead(name=name, evaluator=task.evaluator, primary_metric=task.primary_metric,
                              splits=list(task.data), adapter=str(service.workspace.adapter_path(name)),
                              reference=reference))
    return items


@router.get("/evaluations", response_model=EvaluationPage, operation_id="list_evaluations",
            summary="Query the eval index (SQLite mirror of every eval/index.json)",
            responses=problem_responses(401, 403, 422))
def evaluations(
    db: ReadDbDep,
    method: str | None = None,
    task: str | None = None,
    split: str | None = None,
    tag: str | None = None,
    subset: Annotated[str | None, Query(description="subset namespace; empty = full split")] = None,
    sort: Annotated[Literal["created_at", "objective", "metric", "interference"], Query(
        description="`metric` and `interference` sort by one task's value and need `task` "
        "(422 without it)")] = "created_at",
    order: Literal["asc", "desc"] = "desc",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> EvaluationPage:
    entries, total = crud.query_evaluations(
        db, method=method, task=task, split=split, tag=tag, subset=subset, sort=sort,
        descending=order == "desc", limit=limit, offset=offset,
    )
    items = [EvaluationRead.model_validate({**e.entry, "params": e.entry.get("params", {})})
             for e in entries]
    return EvaluationPage(total=total, items=items)


def _run_dir(service: ServiceDep, run_id: str) -> Path:
    if not re.match(RUN_ID_PATTERN, run_id):
        raise NotFound(f"run {run_id!r} not found (run ids look like run_YYYYMMDD_HHMMSS)")
    matches = find_run_dirs(service.artifacts_dir, run_id)
    if not matches:
        raise NotFound(f"run {run_id!r} not found")
    if len(matches) > 1:
        raise Conflict(f"run id {run_id!r} is ambiguous: {', '.join(str(m) for m in matches)}")
    return matches[0]


@router.get("/runs/{run_id}", response_model=RunRead, operation_id="get_run",
            summary="A run bundle's metadata, summary and evaluation results",
            responses=problem_responses(401, 403, 404, 409, 422))
def get_run(run_id: str, service: ServiceDep) -> RunRead:
    run_dir = _run_dir(service, run_id)
    read = lambda name: json.loads((run_dir / name).read_text()) if (run_dir / name).is_file() else None  # noqa: E731
    evals = {split: json.loads(path.read_text()) for split, path in run_eval_results_files(run_dir).items()}
    saved = (run_dir / WEIGHTS_FILE).is_file()
    return RunRead(run_id=run_id, run_dir=str(run_dir), metadata=read(RUN_METADATA_FILE) or {},
                   summary=read(RUN_SUMMARY_FILE), eval_results=evals,
                   adapter_url=f"/runs/{run_id}/adapter.zip" if saved else None)


@router.get("/runs/{run_id}/adapter.zip", operation_id="download_run_adapter",
            summary="The run's saved PEFT adapter (config, weights, heads) as a zip",
            response_class=Response,
            responses={200: {"content": binary_content(ZIP),
                             "description": "zip",
                             "headers": {"Content-Disposition": {
                                 "description": 'attachment; filename="<run_id>.zip"',
                                 "schema": {"type": "string"}}}},
                       **problem_responses(401, 403, 404, 409, 422)})
def download_adapter(run_id: str, service: ServiceDep, request: Request) -> Response:
    run_dir = _run_dir(service, run_id)
    files = [run_dir / CONFIG_FILE, run_dir / WEIGHTS_FILE,
             *head_files(run_dir)]
    if not files[1].is_file():
        raise NotFound(f"run {run_id} did not save an adapter (save_merged was false)")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in files:
            if path.is_file():
                archive.write(path, path.relative_to(run_dir).as_posix())
    return Response(buffer.getvalue(), media_type=binary_media_type(request.headers.get("accept"), ZIP),
                    headers={"Content-Disposition": f'attachment; filename="{run_id}.zip"'})
