"""The OpenAPI document: what FastAPI derives from the routes, plus what only the running
service knows.

- `method` is an enum of the method registry's names (merging_core's registry is the one list);
  `eval_tasks` items are an enum of the workspace's tasks. Both are read when the document is
  built, at start-up (the lifespan builds it once the workspace is loaded).
- The request examples name the workspace's own tasks, so /docs' "Try it out" works on any
  workspace.
- Links lead from a job to what it made: its run (`GET /runs/{run_id}`, the adapter zip), a
  sweep's trials and plot, and back to the job itself, so clients (and schemathesis' stateful
  phase) can follow them.

Rules OpenAPI cannot state (how long a list must be for the number of adapters, a method's own
params, paths that must exist, `sort=metric` needing `task`) are checked by the service (422);
`schemathesis.toml` lists the routes where schema-valid data may meet them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from app.api.errors import Problem
from merging_core.engine import list_methods

OCTET_STREAM = "application/octet-stream"


def binary_content(media_type: str) -> dict[str, Any]:
    """The `content` of a binary response: its own media type, or the same bytes as
    application/octet-stream for a client that asks for that (generic generated clients know
    no image/png or application/zip)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {media_type: binary, OCTET_STREAM: copy.deepcopy(binary)}


def binary_media_type(accept: str | None, media_type: str) -> str:
    """`media_type`, unless the Accept header asks for application/octet-stream and not it."""
    accept = (accept or "").lower()
    return OCTET_STREAM if OCTET_STREAM in accept and media_type not in accept else media_type


# OpenAPI link objects, by operationId. A JSON pointer into the response body names each value.
JOB_LINKS: dict[str, dict[str, Any]] = {
    "GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/id"},
               "description": "the job's status, progress and result"},
    "CancelJob": {"operationId": "cancel_job", "parameters": {"job_id": "$response.body#/id"},
                  "description": "cancel the job"},
    "JobEvents": {"operationId": "job_events", "parameters": {"job_id": "$response.body#/id"},
                  "description": "follow the job with server-sent events"},
}
RUN_LINKS: dict[str, dict[str, Any]] = {
    "GetRun": {"operationId": "get_run", "parameters": {"run_id": "$response.body#/run_id"},
               "description": "the run bundle a finished merge wrote (run_id is set then)"},
    "DownloadRunAdapter": {"operationId": "download_run_adapter",
                           "parameters": {"run_id": "$response.body#/run_id"},
                           "description": "the run's saved adapter as a zip (save_merged)"},
}
SWEEP_LINKS: dict[str, dict[str, Any]] = {
    "ListSweepTrials": {"operationId": "list_sweep_trials",
                        "parameters": {"job_id": "$response.body#/id"},
                        "description": "a sweep job's trials so far, with the best"},
    "GetSweepPlot": {"operationId": "get_sweep_plot", "parameters": {"job_id": "$response.body#/id"},
                     "description": "a sweep job's plot (partial while it runs)"},
}

# operationId -> (status, links) the document adds.
_LINKS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "create_merge": ("202", {**JOB_LINKS, **RUN_LINKS}),
    "create_evaluation": ("202", JOB_LINKS),
    "create_sweep": ("202", {**JOB_LINKS, **SWEEP_LINKS}),
    "get_job": ("200", {**JOB_LINKS, **RUN_LINKS, **SWEEP_LINKS}),
    "cancel_job": ("200", {**JOB_LINKS, **RUN_LINKS, **SWEEP_LINKS}),
    "get_run": ("200", {"DownloadRunAdapter": RUN_LINKS["DownloadRunAdapter"]}),
}


def _operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {operation["operationId"]: operation for item in document["paths"].values()
            for operation in item.values() if isinstance(operation, dict) and "operationId" in operation}


def _with_tasks(example: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """The example with its adapters and eval_tasks named after the workspace's tasks."""
    example = copy.deepcopy(example)
    for key in ("adapters", "eval_tasks"):
        if key in example:
            example[key] = list(tasks[: len(example[key])])
    return example


def complete_openapi(document: dict[str, Any], *, tasks: Sequence[str]) -> dict[str, Any]:
    """Add to FastAPI's document what the registry and the workspace say (in place)."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    # The Problem schema is a named component every documented error points at.
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    config = schemas["MergeConfig"]["properties"]
    config["method"]["enum"] = sorted(method.name for method in list_methods())
    config["method"]["description"] = "a registered merge method (GET /methods)"
    eval_tasks = next(choice for choice in config["eval_tasks"]["anyOf"] if choice.get("type") == "array")
    eval_tasks["items"] = {"type": "string", "enum": list(tasks)}
    config["adapters"]["description"] = (
        "workspace task names (their adapters) or adapter directories inside the allowed roots")
    operations = _operations(document)
    for operation_id in ("create_merge", "create_evaluation", "create_sweep"):
        content = operations[operation_id]["requestBody"]["content"]["application/json"]
        for example in content.get("examples", {}).values():
            example["value"] = _with_tasks(example["value"], tasks)
    for operation_id, (status, links) in _LINKS.items():
        operations[operation_id]["responses"][status]["links"] = copy.deepcopy(links)
    return document
