"""End-to-end on real data: the real all-MiniLM-L6-v2 base model, the demo workspace's real
task data (copied from ../shared/datasets into workspaces/demo/data) and its trained adapters."""

from __future__ import annotations

from pathlib import Path

import pytest

from merging_core import run_merge
from merging_core.config import parse_merge_config
from merging_core.evaluation.evaluate import EvalSession
from merging_core.search import run_sweep
from merging_core.evaluation.workspace import load_workspace

DEMO = Path(__file__).resolve().parents[1] / "workspaces" / "demo" / "workspace.yaml"


@pytest.fixture(scope="module")
def demo_session(tmp_path_factory: pytest.TempPathFactory) -> EvalSession:
    return EvalSession.from_workspace(load_workspace(DEMO), tmp_path_factory.mktemp("demo") / "artifacts",
                                      device="cpu")


def test_ties_merge_on_real_tasks(demo_session: EvalSession) -> None:
    workspace = demo_session.workspace
    merged = run_merge({"adapters": ["intent", "sentiment"], "method": "ties"},
                       task_registry=workspace.task_registry(), artifacts_dir=demo_session.root)
    result = demo_session.evaluate_merge(merged.output, merge_tag=merged.merge_tag,
                                         run_dir=merged.run_dir)
    for task in ("intent", "sentiment"):
        task_result = result.tasks[task]
        assert task_result.reference.primary > 0.8  # the task's own adapter works
        assert task_result.base is not None
        assert task_result.merged.num_samples == {"intent": 700, "sentiment": 600}[task]
        assert task_result.interference_delta == pytest.approx(
            task_result.merged.primary - task_result.reference.primary)
    # Merging keeps most of each task's skill; the base model with the head alone does not.
    assert result.tasks["intent"].merged.primary > result.tasks["intent"].base.primary


def test_bayes_sweep_on_a_real_eval_subset(demo_session: EvalSession) -> None:
    config = parse_merge_config({
        "adapters": ["intent", "sentiment"], "method": "weighted_delta",
        "eval_subset": {"max_samples": 60, "stratified": True, "seed": 0},
        "search": {"type": "bayes", "budget": 6, "init_points": 3, "seed": 0,
                   "space": {"lambda": {"min": 0.0, "max": 1.0}}},
    })
    result = run_sweep(config, demo_session)
    assert len(result.trials) == 6
    assert {t.source for t in result.trials} == {"sobol", "gp"}
    assert all(t.metrics["intent"] >= 0 and t.metrics["sentiment"] >= 0 for t in result.trials)
    best = result.best
    assert best.objective == max(t.objective for t in result.trials)
    # With lambda at an extreme one task is lost; the best point balances both.
    assert 0.0 < best.point["lambda"] < 1.0
