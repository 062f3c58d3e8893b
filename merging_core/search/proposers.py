"""What to try next: grid, Sobol and GP proposers behind one interface.

A proposer hands out `Proposal`s for trial indices in order. `propose(n, pending)` returns up
to `n` proposals after the `pending` ones (proposed, not yet observed); `observe(trials)` feeds
back finished trials, resumed ones included, in index order. Every proposal is a function of
its index and of what was observed before it, so a resumed sweep proposes exactly what the
interrupted one would have (Sobol points are drawn from the seed; the GP's acquisition is
seeded per index).

- `GridProposer`: the grid's points in order; a warm-start trial at the same point is reused.
- `BayesProposer`: `init_points` scrambled Sobol points (fewer when warm-start trials exist),
  then a botorch `SingleTaskGP` with the configured acquisition over every observation
  (warm start included); pending points are passed to the acquisition as `X_pending`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from merging_core.config.schema import SearchConfig
from merging_core.search.space import Dimension, grid_points
from merging_core.search.trials import Trial


@dataclass(frozen=True)
class Proposal:
    """A point to evaluate as trial `index`. `reuse` is an earlier trial at this very point
    (warm start): it is recorded as this trial without being evaluated again."""

    index: int
    point: dict[str, Any]
    source: str
    reuse: dict[str, Any] | None = None


class Proposer(Protocol):
    total: int

    def propose(self, n: int, pending: Sequence[Proposal] = ()) -> list[Proposal]: ...

    def observe(self, trials: Sequence[Trial]) -> None: ...


def _key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


class GridProposer:
    def __init__(self, search: SearchConfig, warm: Sequence[dict[str, Any]]) -> None:
        self.points = grid_points(search)
        self.total = len(self.points)
        self.warm = {_key(trial["point"]): trial for trial in warm}
        self.observed = 0

    def propose(self, n: int, pending: Sequence[Proposal] = ()) -> list[Proposal]:
        start = self.observed + len(pending)
        proposals = []
        for index in range(start, min(start + n, self.total)):
            point = self.points[index]
            reuse = self.warm.get(_key(point))
            proposals.append(Proposal(index, point, "warm_start" if reuse else "grid", reuse))
        return proposals

    def observe(self, trials: Sequence[Trial]) -> None:
        self.observed += len(trials)


class BayesProposer:
    def __init__(self, search: SearchConfig, dimensions: Sequence[Dimension],
                 warm: Sequence[dict[str, Any]]) -> None:
        self.search = search
        self.dimensions = list(dimensions)
        self.total = search.budget
        self.observations: list[dict[str, Any]] = list(warm)  # {"point", "objective"}
        self.observed = 0
        n_sobol = max(0, search.init_points - len(warm))
        self.sobol: list[list[float]] = []
        if n_sobol:
            from torch.quasirandom import SobolEngine

            engine = SobolEngine(len(self.dimensions), scramble=True, seed=search.seed)
            self.sobol = engine.draw(n_sobol, dtype=torch.float64).tolist()

    def _point(self, unit: Sequence[float]) -> dict[str, Any]:
        return {d.name: d.from_unit(u) for d, u in zip(self.dimensions, unit)}

    def _unit(self, point: dict[str, Any]) -> list[float]:
        return [d.to_unit(point[d.name]) for d in self.dimensions]

    def propose(self, n: int, pending: Sequence[Proposal] = ()) -> list[Proposal]:
        start = self.observed + len(pending)
        queued = list(pending)
        proposals: list[Proposal] = []
        for index in range(start, min(start + n, self.total)):
            if index < len(self.sobol):
                proposal = Proposal(index, self._point(self.sobol[index]), "sobol")
            else:
                unit = suggest(
                    [self._unit(o["point"]) for o in self.observations],
                    [o["objective"] for o in self.observations],
                    len(self.dimensions), self.search.acquisition, self.search.seed * 7919 + index,
                    pending=[self._unit(p.point) for p in queued],
                )
                proposal = Proposal(index, self._point(unit), "gp")
            queued.append(proposal)
            proposals.append(proposal)
        return proposals

    def observe(self, trials: Sequence[Trial]) -> None:
        self.observed += len(trials)
        self.observations += [{"point": t.point, "objective": t.objective} for t in trials]


def suggest(
    observed_x: list[list[float]], observed_y: list[float], dims: int, acquisition: str, seed: int,
    pending: list[list[float]] | None = None,
) -> list[float]:
    """One point in [0, 1]^d from a GP fitted to the observations (quietly: a flat or noisy
    objective makes the GP fit and the optimiser warn loudly, yet the proposal is valid)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _suggest(observed_x, observed_y, dims, acquisition, seed, pending or [])


def _suggest(observed_x: list[list[float]], observed_y: list[float], dims: int, acquisition: str,
             seed: int, pending: list[list[float]]) -> list[float]:
    from botorch.acquisition import ExpectedImprovement, LogExpectedImprovement
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from botorch.optim import optimize_acqf
    from botorch.sampling import SobolQMCNormalSampler
    from gpytorch.mlls import ExactMarginalLogLikelihood

    torch.manual_seed(seed)
    train_x = torch.tensor(observed_x, dtype=torch.float64)
    train_y = torch.tensor(observed_y, dtype=torch.float64).unsqueeze(-1)
    model = SingleTaskGP(train_x, train_y, outcome_transform=Standardize(m=1))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    x_pending = torch.tensor(pending, dtype=torch.float64) if pending else None
    if acquisition == "qlognei":
        sampler = SobolQMCNormalSampler(sample_shape=torch.Size([128]), seed=seed)
        acq = qLogNoisyExpectedImprovement(model, X_baseline=train_x, sampler=sampler,
                                           X_pending=x_pending)
    elif acquisition == "logei":
        acq = LogExpectedImprovement(model, best_f=train_y.max())
    else:
        acq = ExpectedImprovement(model, best_f=train_y.max())
    bounds = torch.stack([torch.zeros(dims), torch.ones(dims)]).to(torch.float64)
    candidate, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=8, raw_samples=256)
    return [float(v) for v in candidate[0].clamp(0, 1)]


ProposerFactory = Callable[[SearchConfig, Sequence[Dimension], Sequence[dict[str, Any]]], Proposer]
PROPOSERS: dict[str, ProposerFactory] = {
    "grid": lambda search, dimensions, warm: GridProposer(search, warm),
    "bayes": BayesProposer,
}


def make_proposer(search: SearchConfig, dimensions: Sequence[Dimension],
                  warm: Sequence[dict[str, Any]]) -> Proposer:
    return PROPOSERS[search.type](search, dimensions, warm)
