"""What an evaluation returns: per-task metrics against each task's own adapter.

`interference_delta[t]` = merged - reference for higher-is-better metrics and reference - merged
for lower-is-better ones, so positive always means the merge is better than the task's own
adapter. `normalized[t]` = merged / reference (reference / merged when lower is better).
Writing these into the artifact layout is `evaluation.writer`'s job, not the evaluator's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging_core.evaluation.evaluators import EvalMetrics


def interference_delta(merged: float, reference: float, direction: str) -> float:
    return merged - reference if direction == "higher" else reference - merged


def normalized_score(merged: float, reference: float, direction: str) -> float | None:
    numerator, denominator = (merged, reference) if direction == "higher" else (reference, merged)
    return numerator / denominator if denominator else None


@dataclass
class TaskResult:
    task: str
    merged: EvalMetrics
    reference: EvalMetrics
    base: EvalMetrics | None
    interference_delta: float
    normalized: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.merged.primary_metric,
            "direction": self.merged.direction,
            "merged": self.merged.to_dict(),
            "reference": self.reference.to_dict(),
            "base": self.base.to_dict() if self.base else None,
            "interference_delta": self.interference_delta,
            "normalized": self.normalized,
        }


@dataclass
class EvaluationResult:
    id: str
    merge_tag: str
    method: str
    adapters: list[str]
    split: str
    subset: str | None
    tasks: dict[str, TaskResult]
    params: dict[str, Any] = field(default_factory=dict)  # the merge's method params
    lambda_policy: dict[str, Any] = field(default_factory=dict)  # as described in run metadata
    results_file: Path | None = None  # set once written (see evaluation.writer)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def objective(self) -> float:
        """Max-min ranking's objective: the worst task's interference delta."""
        return min(r.interference_delta for r in self.tasks.values())

    @property
    def metrics(self) -> dict[str, float]:
        return {t: r.merged.primary for t, r in self.tasks.items()}

    @property
    def deltas(self) -> dict[str, float]:
        return {t: r.interference_delta for t, r in self.tasks.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "merge_tag": self.merge_tag,
            "method": self.method,
            "adapters": self.adapters,
            "split": self.split,
            "subset": self.subset,
            "objective_min_delta": self.objective,
            "metrics": self.metrics,
            "interference_delta": self.deltas,
            "tasks": {t: r.to_dict() for t, r in self.tasks.items()},
            **self.extra,
        }
