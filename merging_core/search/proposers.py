"""What to try next: grid, Sobol and GP proposers behind one interface.

A proposer hands out `Proposal`s for trial indices in order. `propose(n, pending)` returns up
to `n` proposals after the `pending` ones (proposed, not yet observed); `observe(trials)` feeds
back finished trials, resumed ones included: as they finish where `observes_out_of_order`
(grid, bayes), else in index order. Every proposal is a function of
its index and of what was observed before it, so a resumed sweep proposes exactly what the
interrupted one would have (Sobol points are drawn from the seed; the GP's acquisition is
seeded per index).

- `GridProposer`: the grid's points in order; a warm-start trial at the same point is reused.
- `BayesProposer`: `init_points` scrambled Sobol points (fewer when warm-start trials exist),
  then a botorch `SingleTaskGP` with the configured acquisition over every observation
  (warm start included); pending points are passed to the acquisition as `X_pending`.
- `SuccessiveHalvingProposer` (`search.multi_fidelity`): brackets of successive halving. A
  bracket's `eta^(R-1)` candidates are scored at the smallest fidelity, the best 1/eta of them
  re-scored at the next, and so on, one reaching the top fidelity. The first `init_points`
  candidates (fewer with warm-start trials) are Sobol points; then each bracket's are one
  qLogNEI batch from a GP fitted to the observations of one fidelity only, the highest with
  at least d + 2 of them (d searched coordinates; BOHB's rule): scores on different subset
  sizes are never mixed in one model, and the model moves up as soon as a more faithful
  fidelity has enough points. A bracket's candidates depend only on the trials before it, so
  a resumed sweep proposes them again.

The GP runs on one torch thread: its matrices are tiny (tens of points), and on shared cores a
thread pool's synchronisation made a proposal 10-30x slower than the arithmetic (0.6-8 s
against 0.05-0.5 s on 2 busy cores), longer than a trial.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from merging_core.config.schema import SearchConfig
from merging_core.search.space import Dimension, grid_points
from merging_core.search.trials import Trial


@dataclass(frozen=True)
class Proposal:
    """A point to evaluate as trial `index`. `reuse` is an earlier trial at this very point
    (warm start): it is recorded as this trial without being evaluated again. `fidelity` is
    the eval subset size to score it at (multi-fidelity sweeps; None: the sweep's subset) and
    `promoted_from` the lower-fidelity trial it re-scores."""

    index: int
    point: dict[str, Any]
    source: str
    reuse: dict[str, Any] | None = None
    fidelity: int | None = None
    promoted_from: int | None = None


class Proposer(Protocol):
    total: int
    # Whether finished trials may be observed as they finish (else in index order only).
    observes_out_of_order: bool

    def propose(self, n: int, pending: Sequence[Proposal] = ()) -> list[Proposal]: ...

    def observe(self, trials: Sequence[Trial]) -> None: ...


def _key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


class GridProposer:
    observes_out_of_order = True

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
    observes_out_of_order = True  # the GP sees every finished trial at once

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
        """Sobol points while they last, then GP points. One GP point with nothing pending
        uses the configured acquisition as it is; a batch (several idle workers) or pending
        points (trials still running) is one Monte Carlo acquisition of q points with the
        pending ones as `X_pending` (ei -> qEI, logei -> qLogEI, qlognei as it is)."""
        start = self.observed + len(pending)
        queued = list(pending)
        proposals: list[Proposal] = []
        indices = range(start, min(start + n, self.total))
        for index in (i for i in indices if i < len(self.sobol)):
            proposal = Proposal(index, self._point(self.sobol[index]), "sobol")
            queued.append(proposal)
            proposals.append(proposal)
        # GP points need an observation to model: none yet (every Sobol point still running),
        # they wait for the first result.
        batch = [i for i in indices if i >= len(self.sobol)] if self.observations else []
        if batch:
            units = suggest_batch(
                [self._unit(o["point"]) for o in self.observations],
                [o["objective"] for o in self.observations],
                len(self.dimensions), self.search.seed * 7919 + batch[0], len(batch),
                acquisition=self.search.acquisition, pending=[self._unit(p.point) for p in queued],
            )
            proposals += [Proposal(index, self._point(unit), "gp") for index, unit in zip(batch, units)]
        return proposals

    def observe(self, trials: Sequence[Trial]) -> None:
        self.observed += len(trials)
        self.observations += [{"point": t.point, "objective": t.objective} for t in trials]


@dataclass(frozen=True)
class _Candidate:
    point: dict[str, Any]
    source: str


class SuccessiveHalvingProposer:
    """Successive halving over Sobol/GP candidates (`search.multi_fidelity`; see the module
    docstring). Trial `index` falls in bracket `index // bracket_size`; within a bracket the
    rungs follow each other, smallest fidelity first."""

    observes_out_of_order = False  # brackets and rungs are slices of the trials in index order

    def __init__(self, search: SearchConfig, dimensions: Sequence[Dimension],
                 warm: Sequence[dict[str, Any]]) -> None:
        assert search.multi_fidelity is not None
        self.search = search
        self.dimensions = list(dimensions)
        self.total = search.budget
        self.fidelities = list(search.multi_fidelity.fidelities)
        self.rung_sizes = search.multi_fidelity.rung_sizes
        self.bracket_size = search.multi_fidelity.bracket_size
        top = self.fidelities[-1]
        # Warm-start trials were checked to be at one of our fidelities (none named: the
        # summary's eval subset, i.e. the top one).
        self.warm = [{**trial, "fidelity": trial.get("fidelity") or top} for trial in warm]
        self.trials: list[Trial] = []
        self.candidates: dict[int, list[_Candidate]] = {}  # bracket -> its rung-0 candidates
        from torch.quasirandom import SobolEngine

        self.n_sobol = max(0, search.init_points - len(warm))
        n_candidates = -(-self.total // self.bracket_size) * self.rung_sizes[0]
        engine = SobolEngine(len(self.dimensions), scramble=True, seed=search.seed)
        self.sobol: list[list[float]] = engine.draw(n_candidates, dtype=torch.float64).tolist()

    def slot(self, index: int) -> tuple[int, int, int]:
        """(bracket, rung, position in the rung) of trial `index`."""
        bracket, offset = divmod(index, self.bracket_size)
        for rung, size in enumerate(self.rung_sizes):
            if offset < size:
                return bracket, rung, offset
            offset -= size
        raise AssertionError("unreachable: the rungs fill the bracket")

    def _point(self, unit: Sequence[float]) -> dict[str, Any]:
        return {d.name: d.from_unit(u) for d, u in zip(self.dimensions, unit)}

    def _unit(self, point: dict[str, Any]) -> list[float]:
        return [d.to_unit(point[d.name]) for d in self.dimensions]

    @property
    def model_min_points(self) -> int:
        """Observations a fidelity needs before the GP models it: d + 2 (BOHB's rule)."""
        return len(self.dimensions) + 2

    def model_fidelity(self, before: int) -> int | None:
        """The fidelity the GP models for a bracket starting at trial `before`: the highest
        with at least d + 2 observations (warm start included); None: none has them."""
        observations = [*self.warm, *({"fidelity": t.fidelity} for t in self.trials[:before])]
        for fidelity in reversed(self.fidelities):
            if sum(o["fidelity"] == fidelity for o in observations) >= self.model_min_points:
                return fidelity
        return None

    def _bracket_candidates(self, bracket: int) -> list[_Candidate]:
        if bracket not in self.candidates:
            start = bracket * self.bracket_size
            n = self.rung_sizes[0]
            first = bracket * n  # candidates drawn before this bracket
            n_sobol = max(0, min(n, self.n_sobol - first))
            fidelity = self.model_fidelity(start) if n_sobol < n else None
            if fidelity is None:
                n_sobol = n
            batch = [_Candidate(self._point(u), "sobol") for u in self.sobol[first : first + n_sobol]]
            if n_sobol < n:
                observed = [*({"point": w["point"], "objective": w["objective"]} for w in self.warm
                              if w["fidelity"] == fidelity),
                            *({"point": t.point, "objective": t.objective} for t in self.trials[:start]
                              if t.fidelity == fidelity)]
                units = suggest_batch([self._unit(o["point"]) for o in observed],
                                      [o["objective"] for o in observed], len(self.dimensions),
                                      self.search.seed * 7919 + start, n - n_sobol)
                batch += [_Candidate(self._point(u), "gp") for u in units]
            self.candidates[bracket] = batch
        return self.candidates[bracket]

    def propose(self, n: int, pending: Sequence[Proposal] = ()) -> list[Proposal]:
        """Up to `n` proposals after the pending ones; fewer where the next trial waits on
        results not observed yet (a promotion needs its whole rung, a bracket the last one)."""
        start = len(self.trials) + len(pending)
        proposals: list[Proposal] = []
        for index in range(start, min(start + n, self.total)):
            bracket, rung, position = self.slot(index)
            fidelity = self.fidelities[rung]
            if rung == 0:
                if len(self.trials) < bracket * self.bracket_size:
                    break
                candidate = self._bracket_candidates(bracket)[position]
                proposals.append(Proposal(index, candidate.point, candidate.source, fidelity=fidelity))
                continue
            rung_start = bracket * self.bracket_size + sum(self.rung_sizes[: rung - 1])
            previous = self.trials[rung_start : rung_start + self.rung_sizes[rung - 1]]
            if len(previous) < self.rung_sizes[rung - 1]:
                break
            parent = sorted(previous, key=lambda t: (-t.objective, t.index))[position]
            proposals.append(Proposal(index, parent.point, parent.source, fidelity=fidelity,
                                      promoted_from=parent.index))
        return proposals

    def observe(self, trials: Sequence[Trial]) -> None:
        self.trials += trials


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for the GP's tiny matrices (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def suggest(
    observed_x: list[list[float]], observed_y: list[float], dims: int, acquisition: str, seed: int,
    pending: list[list[float]] | None = None,
) -> list[float]:
    """One point in [0, 1]^d from a GP fitted to the observations (quietly: a flat or noisy
    objective makes the GP fit and the optimiser warn loudly, yet the proposal is valid)."""
    with warnings.catch_warnings(), one_torch_thread():
        warnings.simplefilter("ignore")
        return _suggest(observed_x, observed_y, dims, acquisition, seed, pending or [], 1)[0]


def suggest_batch(observed_x: list[list[float]], observed_y: list[float], dims: int, seed: int,
                  q: int, *, acquisition: str = "qlognei",
                  pending: list[list[float]] | None = None) -> list[list[float]]:
    """`q` points in [0, 1]^d from one GP fit, given `pending` points still being evaluated.
    q = 1 with nothing pending is `suggest`. Otherwise the acquisition's Monte Carlo form
    (the analytic EI and LogEI take neither q > 1 nor pending points) is optimised greedily,
    each point conditioned on those before it and on the pending ones (botorch's sequential
    batch optimisation with `X_pending`)."""
    if q == 1 and not pending:
        return [suggest(observed_x, observed_y, dims, acquisition, seed)]
    with warnings.catch_warnings(), one_torch_thread():
        warnings.simplefilter("ignore")
        return _suggest(observed_x, observed_y, dims, MONTE_CARLO[acquisition], seed, pending or [], q)


# The batch (Monte Carlo) form of each acquisition.
MONTE_CARLO = {"ei": "qei", "logei": "qlogei", "qlognei": "qlognei"}


def _suggest(observed_x: list[list[float]], observed_y: list[float], dims: int, acquisition: str,
             seed: int, pending: list[list[float]], q: int) -> list[list[float]]:
    from botorch.acquisition import ExpectedImprovement, LogExpectedImprovement, qExpectedImprovement
    from botorch.acquisition.logei import qLogExpectedImprovement, qLogNoisyExpectedImprovement
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
    sampler = SobolQMCNormalSampler(sample_shape=torch.Size([128]), seed=seed)
    if acquisition == "qlognei":
        acq = qLogNoisyExpectedImprovement(model, X_baseline=train_x, sampler=sampler,
                                           X_pending=x_pending)
    elif acquisition == "qlogei":
        acq = qLogExpectedImprovement(model, best_f=train_y.max(), sampler=sampler, X_pending=x_pending)
    elif acquisition == "qei":
        acq = qExpectedImprovement(model, best_f=train_y.max(), sampler=sampler, X_pending=x_pending)
    elif acquisition == "logei":
        acq = LogExpectedImprovement(model, best_f=train_y.max())
    else:
        acq = ExpectedImprovement(model, best_f=train_y.max())
    bounds = torch.stack([torch.zeros(dims), torch.ones(dims)]).to(torch.float64)
    candidates, _ = optimize_acqf(acq, bounds=bounds, q=q, num_restarts=8, raw_samples=256,
                                  sequential=q > 1)
    return [[float(v) for v in row.clamp(0, 1)] for row in candidates]


ProposerFactory = Callable[[SearchConfig, Sequence[Dimension], Sequence[dict[str, Any]]], Proposer]
PROPOSERS: dict[str, ProposerFactory] = {
    "grid": lambda search, dimensions, warm: GridProposer(search, warm),
    "bayes": BayesProposer,
    "bayes_multi_fidelity": SuccessiveHalvingProposer,
}


def make_proposer(search: SearchConfig, dimensions: Sequence[Dimension],
                  warm: Sequence[dict[str, Any]]) -> Proposer:
    kind = "bayes_multi_fidelity" if search.multi_fidelity is not None else search.type
    return PROPOSERS[kind](search, dimensions, warm)
