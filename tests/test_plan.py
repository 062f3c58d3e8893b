"""Plan, then execute: validation plans a request and never computes.

Planning (what the service does to validate a POST) must not run an optimizer, build a dense
delta, run the model or change it in any way (weights, hooks, gradient flags). The spies below
fail loudly if it does; the same holds through the real HTTP service, whose worker is parked so
that only validation runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from app.db import JobKind
from app.settings import Settings
from app.worker import plan_job
from merging_core.adapters import AdapterCache, LoraModule
from merging_core.config import parse_merge_config
from merging_core.engine.plan import MergePlan, plan_merge
from merging_core.engine.runner import execute
from merging_core.errors import ParamError
from merging_core.evaluation.holder import ModelHolder
from merging_core.plugins import adamerging
from merging_core.plugins.optimizer_base import OptimizerSpec
from merging_core.search import SweepPlan
from tests.service_helpers import thread_server, wait_job

TASKS = ["topic", "mood"]
ADAMERGING = {"name": "adamerging", "params": {"steps": 5}}
REQUESTS: list[tuple[JobKind, dict[str, Any]]] = [
    (JobKind.MERGE, {"adapters": TASKS, "method": "task_vector", "optimizer": ADAMERGING,
                     "eval_tasks": TASKS, "save_merged": True}),
    (JobKind.MERGE, {"adapters": TASKS, "method": "weighted_delta", "optimizer": ADAMERGING}),
    (JobKind.MERGE, {"adapters": TASKS, "method": "ties", "eval_tasks": TASKS, "save_merged": True}),
    (JobKind.EVALUATE, {"adapters": TASKS, "method": "dare_ties", "eval_tasks": TASKS}),
    (JobKind.SWEEP, {"adapters": TASKS, "method": "weighted_delta",
                     "search": {"type": "grid", "grid": {"lambda": [i / 50 for i in range(51)]}}}),
    (JobKind.SWEEP, {"adapters": TASKS, "method": "task_vector",
                     "search": {"type": "bayes", "budget": 4,
                                "space": {"lambda": {"min": 0, "max": 2, "per_adapter": True}}}}),
]


class _Computed(AssertionError):
    pass


def _refuse_all(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every kind of computation fail (and record it): dense deltas, optimizer runs,
    forward passes, and every holder operation that changes the model."""
    seen: list[str] = []

    def refuse(what: str):  # type: ignore[no-untyped-def]
        def refused(*args: Any, **kwargs: Any) -> Any:
            seen.append(what)
            raise _Computed(f"validation {what}")

        return refused

    monkeypatch.setattr(LoraModule, "delta", refuse("built a dense delta"))
    monkeypatch.setattr(adamerging.AdaMergingTrainer, "__init__", refuse("started AdaMerging"))
    # A class-level property wins over the frozen specs' own `run` field: no optimizer can run.
    monkeypatch.setattr(OptimizerSpec, "run", property(lambda spec: refuse(f"ran optimizer {spec.name}")),
                        raising=False)
    monkeypatch.setattr(nn.Module, "__call__", refuse("ran a model"))
    for operation in ("apply", "applied", "head", "hooked", "frozen", "cpu_float32"):
        monkeypatch.setattr(ModelHolder, operation, refuse(f"called holder.{operation}"))
    return seen


@pytest.fixture
def no_computation(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return _refuse_all(monkeypatch)


def _workspace(tiny_workspace: Path):  # type: ignore[no-untyped-def]
    from merging_core.evaluation.workspace import load_workspace

    return load_workspace(tiny_workspace)


def test_planning_never_computes(tiny_workspace: Path, no_computation: list[str]) -> None:
    workspace = _workspace(tiny_workspace)
    cache = AdapterCache()
    for kind, request in REQUESTS:
        plan = plan_job(kind, parse_merge_config(request), workspace, cache)
        assert isinstance(plan, SweepPlan if kind is JobKind.SWEEP else MergePlan)
    assert no_computation == []
    assert len(cache) == 2  # each adapter's factors were loaded (and checked) once


def test_plans_are_frozen_and_picklable(tiny_workspace: Path) -> None:
    workspace = _workspace(tiny_workspace)
    for kind, request in REQUESTS:
        plan = plan_job(kind, parse_merge_config(request), workspace)
        copy = pickle.loads(pickle.dumps(plan))
        assert copy == plan
        with pytest.raises(AttributeError):
            plan.config = None  # type: ignore[misc]


def test_an_optimizer_that_sets_the_lambdas_needs_no_lambda(tiny_workspace: Path, tmp_path: Path) -> None:
    workspace = _workspace(tiny_workspace)
    registry = workspace.task_registry()
    with pytest.raises(ParamError, match="requires parameter 'lambda'"):
        plan_merge({"adapters": TASKS, "method": "weighted_delta"}, registry)
    plan = plan_merge({"adapters": TASKS, "method": "weighted_delta", "optimizer": ADAMERGING}, registry)
    assert plan.params["lambda"] == [0.3, 0.3]  # AdaMerging's init_lambda, until it learns
    with pytest.raises(ParamError, match="needs the base model and task data"):
        execute(plan, artifacts_dir=tmp_path)  # no session: refused before anything is written
    assert not list(tmp_path.rglob("run_*"))


def test_every_grid_point_is_validated_at_planning(tiny_workspace: Path) -> None:
    """Values valid one by one may be invalid together (DELLA: density + epsilon/2 <= 1)."""
    workspace = _workspace(tiny_workspace)
    sweep = {"adapters": TASKS, "method": "della",
             "search": {"type": "grid", "grid": {"density": [0.5, 0.95], "epsilon": [0.05, 0.2]}}}
    with pytest.raises(ParamError, match="density=0.95 and epsilon=0.2"):
        plan_job(JobKind.SWEEP, parse_merge_config(sweep), workspace)


def test_adamerging_refuses_adapters_without_heads_at_planning(tiny_workspace: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    workspace = _workspace(tiny_workspace)
    source = workspace.adapter_path("mood")
    headless = tmp_path / "mood_headless"
    headless.mkdir()
    (headless / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(str(source / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "lora_" in k}, str(headless / "adapter_model.safetensors"))
    registry = {**workspace.task_registry(), "mood": headless}
    with pytest.raises(ParamError, match="mood have no head"):
        plan_merge({"adapters": TASKS, "method": "task_vector", "optimizer": ADAMERGING}, registry,
                   task_evaluators=workspace.task_evaluators())


def test_the_service_validates_without_computing(tiny_workspace: Path, tmp_path: Path) -> None:
    """Through uvicorn: POSTs answer 202 (or 422) by planning alone, in the API process, which
    loads no model at all; each job crosses to the worker process with its plan, and runs."""
    settings = Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts")
    loads = ModelHolder.load_count
    with thread_server(settings) as (client, app):
        service = app.state.service
        worker = service.executor
        before = worker.inspect()
        sent: list[tuple[str, Any]] = []
        forward = worker.submit

        def record(job_id: str, plan: Any = None) -> None:
            sent.append((job_id, plan))
            forward(job_id, plan)

        spy = pytest.MonkeyPatch()
        try:
            spy.setattr(worker, "submit", record)
            seen = _refuse_all(spy)
            endpoint = {JobKind.MERGE: "/merges", JobKind.EVALUATE: "/evaluations", JobKind.SWEEP: "/sweeps"}
            for kind, request in REQUESTS:
                answer = client.post(endpoint[kind], json=request)
                assert answer.status_code == 202, answer.text
            bad = client.post("/merges", json={**REQUESTS[0][1], "method": "ties"})
            assert bad.status_code == 422
        finally:
            spy.undo()
        assert seen == []
        assert [type(plan) for _, plan in sent] == [
            SweepPlan if kind is JobKind.SWEEP else MergePlan for kind, _ in REQUESTS]
        for job_id, _ in sent:  # the plans ran in the worker process
            assert wait_job(client, job_id)["status"] == "succeeded"
        after = worker.inspect()
        assert after == before and after["pristine"] and after["requires_grad"] and after["hooks"] == 0
    assert ModelHolder.load_count == loads  # not one model load in this (the API's) process
