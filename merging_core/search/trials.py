"""A sweep's trial record and its result."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Trial:
    """One evaluated point. `fidelity` is what it was scored at (the eval subset's
    max_samples, or a multi-fidelity rung's subset size; None for a full split);
    `promoted_from` is the trial at the previous fidelity whose point this one re-scores
    (multi-fidelity sweeps); `worker` names who ran it (None: this process)."""

    index: int
    point: dict[str, Any]
    source: str  # grid | sobol | gp | warm_start
    objective: float
    metrics: dict[str, float]
    interference_delta: dict[str, float]
    method_params: dict[str, Any]
    lambda_policy: dict[str, Any]
    merge_tag: str
    eval_id: str
    duration_s: float
    fidelity: int | None = None
    worker: str | None = None
    promoted_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        """A trial read back from disk; fields a newer writer added are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def ranked_trials(trials: Sequence[Trial], top_fidelity: int | None = None) -> list[Trial]:
    """The trials that rank a sweep, best first (ties: the earlier trial). `top_fidelity`
    (multi-fidelity sweeps) keeps only the trials scored at it; None keeps every trial."""
    kept = [t for t in trials if top_fidelity is None or t.fidelity == top_fidelity]
    return sorted(kept, key=lambda t: (-t.objective, t.index))


@dataclass
class SweepResult:
    """A finished sweep. `top_fidelity` is set for multi-fidelity sweeps: only trials scored
    at it rank (`best`); lower-fidelity trials are screening results."""

    sweep_id: str
    summary_path: Path
    plot_path: Path | None
    trials: list[Trial]
    warm_start: dict[str, Any] = field(default_factory=dict)
    resumed_trials: int = 0
    top_fidelity: int | None = None

    @property
    def ranked(self) -> list[Trial]:
        return ranked_trials(self.trials, self.top_fidelity)

    @property
    def best(self) -> Trial:
        return self.ranked[0]
