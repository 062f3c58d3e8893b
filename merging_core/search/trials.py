"""A sweep's trial record and its result."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Trial:
    """One evaluated point. `fidelity` is what it was scored at (the eval subset's
    max_samples; None for a full split); `worker` names who ran it (None: this process)."""

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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        """A trial read back from disk; fields a newer writer added are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class SweepResult:
    sweep_id: str
    summary_path: Path
    plot_path: Path | None
    trials: list[Trial]
    warm_start: dict[str, Any] = field(default_factory=dict)
    resumed_trials: int = 0

    @property
    def best(self) -> Trial:
        return max(self.trials, key=lambda t: t.objective)
