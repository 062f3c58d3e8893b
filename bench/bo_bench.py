"""Bayes vs grid vs random search for merge coefficients on a real workspace (CPU), and the
time each search takes to come within 0.5 points of the grid's best.

Objective: the sweeps' max-min objective, min over the merged tasks of the interference delta
(merged accuracy - the task's own adapter's accuracy; higher is better), on a stratified subset
of each task's split. Metrics are fractions, so "within 0.5 points" means within 0.005 of the
grid's best objective in accuracy units.

Cases (weighted_delta, the dense sum_i w_i * delta_i):

* (a) 2 adapters (default intent, sentiment), 1 lambda: weights (lambda, 1 - lambda),
  lambda in [0, 1]; grid of 21 points.
* (b) 3 adapters (default intent, banking, sentiment), one lambda per adapter in [0, 1.5]; grid
  of 5^3 = 125 points by default (`--grid-b 6` gives 6^3 = 216).

Grid: our `search.type: grid` sweep (`run_sweep`, resident model), evaluated once,
exhaustively. Random: uniform points with seeds 0..S-1. Bayes: our `search.type: bayes` sweep
(botorch GP, Sobol init points) with seeds 0..S-1. Every objective is memoised by merge weights
and eval subset (also inside the sweeps), so a point that random or bayes proposes and the grid
already evaluated is not evaluated again; the evaluation still counts for the method that
proposed it, and its time (the original evaluation's) is charged to it. Random and bayes stop
at the first evaluation within 0.005 of the grid's best (that is the number reported) or at
their budget, unless `--full-budget` is given. Goal: bayes needs no more than a third of the
grid's evaluations (every seed reaches the threshold and the mean over seeds is at most grid/3).

Time to best (case (b); `--no-time-to-best` leaves it out): wall seconds from a search's start
until its first evaluation within 0.005 of the grid's best, the proposer's own time included:

1. grid, reload per trial: what a script user runs (load the base model and the adapters with
   PEFT, `add_weighted_adapter`, evaluate each task with its head; `bench/sweep_bench.py`'s
   baseline), timed on `--reload-sample` grid points (half before and half after the
   multi-fidelity searches, each half after one warm-up reload) and extrapolated per point to
   the grid's order: the point where our grid first reaches the threshold;
2. our grid (`run_sweep`, resident model), measured;
3. our bayes, measured per seed;
4. our bayes with `search.multi_fidelity` (successive halving, `--fidelities`, `--eta`),
   measured per seed; only a top-fidelity trial counts as reaching the best;
5. botorch's multi-fidelity knowledge gradient (`SingleTaskMultiFidelityGP`,
   `qMultiFidelityKnowledgeGradient` with a cost model, `optimize_acqf_mixed` over the same
   fidelities, as in botorch's discrete multi-fidelity tutorial), a bench-only searcher, per
   seed up to `--mfkg-cap-s` seconds.

The reference and base metrics of every subset are computed before anything is timed (a user
pays them once; they are cached on disk). Goal: the best of ours at least 10x sooner than the
reload-per-trial grid.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bo_bench.py            # demo workspace, prints
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bo_bench.py --write    # also writes
                                  # bench/results/bo_bench_cpu.md and the README's tables
    python scripts/make_tiny_workspace.py /tmp/tinyws                # a quick smoke run:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bo_bench.py --workspace /tmp/tinyws/workspace.yaml \\
        --tasks topic mood --grid-b 4 --budget-b 8 --seeds 2 --samples 24 --fidelities 6 24 \\
        --eta 2 --reload-sample 2 --mfkg-cap-s 20

No number in the output is typed by hand.
"""

from __future__ import annotations  # noqa: I001 (common before torch, see below)

import argparse
import json
import logging
import math
import os
import random
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

# Before torch: importing common puts the checkout on sys.path and Hugging Face offline.
from common import (
    RESULTS_DIR,
    ROOT,
    cpu_line,
    display_path,
    publish,
    replace_marked_block,
    setup_logging,
    utc_stamp,
    versions_line,
)

import torch

import merging_core.search.sweep as sweep_module
from merging_core.config import EvalSubsetConfig, parse_merge_config
from merging_core.engine.merge import MergeOutput
from merging_core.engine.runner import prepare_merge
from merging_core.errors import Cancelled
from merging_core.evaluation.evaluate import EvalSession, EvaluationResult, subset_namespace
from merging_core.evaluation.subsets import FidelitySubsetConfig
from merging_core.evaluation.workspace import load_workspace
from merging_core.methods.weighted_delta import coefficients
from merging_core.runtime.cancel import CancelToken
from merging_core.runtime.paths import sweep_summary_file, trial_file
from merging_core.search import Proposal, Proposer, Trial, plan_sweep, run_sweep
from merging_core.search.proposers import one_torch_thread

# The tokenizers library reads this when it tokenises, not at import, so here is in time.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_WORKSPACE = ROOT / "workspaces" / "demo" / "workspace.yaml"
RESULTS = RESULTS_DIR / "bo_bench_cpu.md"
README = ROOT / "README.md"
SEARCH_MARKERS = ("<!-- bo-search:start -->", "<!-- bo-search:end -->")
TIME_MARKERS = ("<!-- bo-time-to-best:start -->", "<!-- bo-time-to-best:end -->")
TOLERANCE = 0.005  # 0.5 accuracy points; metrics are fractions
EPS = 1e-9  # float noise in objective comparisons
SPEEDUP_GOAL = 10.0  # the reload-per-trial grid's time to best / ours

log = logging.getLogger("bo_bench")

Point = float | tuple[float, ...]


# ------------------------------------------------------------------------------ objective


class MemoObjective:
    """`session.evaluate_merge`, memoised by (adapters, merge weights, split, subset).

    Installed on the session, so the sweeps go through the same memo as random search. A memo
    hit is charged the seconds its original evaluation took (`charged_s`), so a search's time
    is what it would have been without the memo."""

    def __init__(self, session: EvalSession, split: str, subset: EvalSubsetConfig) -> None:
        self.session = session
        self.split = split
        self.subset = subset
        self._real = session.evaluate_merge
        self.cache: dict[tuple[Any, ...], tuple[EvaluationResult, float]] = {}
        self.evaluations = 0  # real ones
        self.hits = 0
        self.seconds = 0.0  # spent in real evaluations
        self.charged_s = 0.0  # what the memo hits would have cost
        session.evaluate_merge = self.evaluate_merge  # type: ignore[method-assign]

    @staticmethod
    def key(output: MergeOutput, split: str, subset: EvalSubsetConfig | None) -> tuple[Any, ...]:
        weights = coefficients(output.params["lambda"], len(output.adapters))
        return (output.method.name, tuple(output.adapter_names),
                tuple(round(w, 9) for w in weights), split, subset_namespace(subset))

    def evaluate_merge(self, output: MergeOutput, **kwargs: Any) -> EvaluationResult:
        key = self.key(output, kwargs.get("split", "test"), kwargs.get("subset"))
        if key in self.cache:
            result, seconds = self.cache[key]
            self.hits += 1
            self.charged_s += seconds
            return result
        start = time.perf_counter()
        result = self._real(output, **kwargs)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.evaluations += 1
        self.cache[key] = (result, seconds)
        return result

    def __call__(self, tasks: Sequence[str], lam: float | list[float],
                 subset: EvalSubsetConfig | None = None) -> float:
        output = prepare_merge(
            {"adapters": list(tasks), "method": "weighted_delta", "method_params": {"lambda": lam}},
            task_registry=self.session.workspace.task_registry(),
            adapter_cache=self.session.adapter_cache,
        )
        result = self.session.evaluate_merge(output, merge_tag="bo_bench", tasks=list(tasks),
                                             split=self.split, subset=subset or self.subset,
                                             write=False)
        return result.objective


# ---------------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    title: str
    tasks: list[str]
    low: float
    high: float
    per_adapter: bool
    grid_axis: list[float]
    init_points: int
    budget: int

    @property
    def dims(self) -> int:
        return len(self.tasks) if self.per_adapter else 1

    def grid(self) -> list[Point]:
        if not self.per_adapter:
            return list(self.grid_axis)
        return [tuple(p) for p in product(self.grid_axis, repeat=self.dims)]

    def lam(self, point: Point) -> float | list[float]:
        return list(point) if isinstance(point, tuple) else float(point)

    def random_point(self, rng: random.Random) -> Point:
        values = tuple(rng.uniform(self.low, self.high) for _ in range(self.dims))
        return values if self.per_adapter else values[0]

    def space(self) -> dict[str, Any]:
        return {"lambda": {"min": self.low, "max": self.high, "per_adapter": self.per_adapter}}

    def describe(self) -> str:
        grid = (f"{len(self.grid_axis)} points" if not self.per_adapter
                else f"{len(self.grid_axis)}^{self.dims} = {len(self.grid())} points")
        space = (f"lambda in [{self.low:g}, {self.high:g}] (weights lambda, 1 - lambda)"
                 if not self.per_adapter else
                 f"one lambda per adapter in [{self.low:g}, {self.high:g}]")
        return (f"{self.title}: adapters {', '.join(self.tasks)}; weighted_delta {space}; grid "
                f"{grid} (axis {', '.join(f'{x:g}' for x in self.grid_axis)}); random/bayes "
                f"budget {self.budget}, bayes init_points {self.init_points}")


def axis(low: float, high: float, n: int) -> list[float]:
    return [round(low + (high - low) * i / (n - 1), 9) for i in range(n)]


# ------------------------------------------------------------------------------- searches


@dataclass
class Run:
    """One search run (one seed) of one method. `times` are seconds from the run's start to
    the end of each evaluation (memo hits charged); `ranked` says which evaluations may reach
    the best (all but a multi-fidelity search's lower-fidelity ones)."""

    method: str
    seed: int | None
    objectives: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    ranked: list[bool] = field(default_factory=list)
    wall_s: float = 0.0
    proposer_s: float = 0.0
    stopped_early: bool = False
    real_evaluations: int = 0  # not memoised
    real_seconds: float = 0.0
    memo_hits: int = 0

    def add(self, objective: float, elapsed_s: float, ranked: bool = True) -> None:
        self.objectives.append(objective)
        self.times.append(elapsed_s)
        self.ranked.append(ranked)

    def reached_at(self, threshold: float) -> int | None:
        """How many evaluations (at every fidelity) until a ranked one is within reach."""
        for index, (value, ranked) in enumerate(zip(self.objectives, self.ranked), start=1):
            if ranked and value >= threshold - EPS:
                return index
        return None

    def time_to(self, threshold: float) -> float | None:
        reached = self.reached_at(threshold)
        return None if reached is None else self.times[reached - 1]

    @property
    def best(self) -> float:
        return max(v for v, ranked in zip(self.objectives, self.ranked) if ranked)

    @property
    def top_evaluations(self) -> int:
        return sum(self.ranked)


class TimedProposer:
    """A sweep's proposer, with the seconds spent in it (fitting, acquisition, bookkeeping)."""

    def __init__(self, inner: Proposer) -> None:
        self.inner = inner
        self.total = inner.total
        self.seconds = 0.0

    def propose(self, n: int, pending: Sequence[Proposal] = ()) -> list[Proposal]:
        start = time.perf_counter()
        try:
            return self.inner.propose(n, pending)
        finally:
            self.seconds += time.perf_counter() - start

    def observe(self, trials: Sequence[Trial]) -> None:
        start = time.perf_counter()
        try:
            self.inner.observe(trials)
        finally:
            self.seconds += time.perf_counter() - start


@contextmanager
def timed_proposers() -> Iterator[list[TimedProposer]]:
    """Wrap every proposer a sweep makes while inside (the sweep module's `make_proposer`)."""
    made: list[TimedProposer] = []
    original = sweep_module.make_proposer

    def make(*args: Any, **kwargs: Any) -> TimedProposer:
        made.append(TimedProposer(original(*args, **kwargs)))
        return made[-1]

    sweep_module.make_proposer = make  # type: ignore[assignment]
    try:
        yield made
    finally:
        sweep_module.make_proposer = original


def clear_sweep(config: Any, session: EvalSession) -> None:
    """Remove what an interrupted earlier start left of this sweep, so it runs (and is timed)
    from its first trial."""
    sweep_id = plan_sweep(config, session.workspace, adapter_cache=session.adapter_cache).sweep_id
    trials = trial_file(session.root, config.method, config.adapters, sweep_id, 0).parent
    shutil.rmtree(trials.parent, ignore_errors=True)
    sweep_summary_file(session.root, config.method, config.adapters, sweep_id).unlink(missing_ok=True)


def sweep_run(run: Run, config: dict[str, Any], objective: MemoObjective,
              stop: Callable[[Trial], bool] | None, top_fidelity: int | None = None, *,
              resumable: bool = False) -> Run:
    """Run one of our sweeps into `run`, stopping (cancel) after a trial for which `stop` is
    true; `top_fidelity`: only trials at it are ranked (multi-fidelity). Times are wall clock
    from the start (the proposer included); a `resumable` sweep (the exhaustive grid) resumes
    what an interrupted start left, and its times are the sum of its trials' durations."""
    cancel = CancelToken()
    charged_before = objective.charged_s
    parsed = parse_merge_config(config)
    if not resumable:
        clear_sweep(parsed, objective.session)
    durations: list[float] = []

    def on_trial(trial: Trial) -> None:
        durations.append(trial.duration_s)
        elapsed = (sum(durations) if resumable else
                   time.perf_counter() - start + (objective.charged_s - charged_before))
        run.add(trial.objective, elapsed, top_fidelity is None or trial.fidelity == top_fidelity)
        if stop is not None and stop(trial):
            cancel.cancel()  # the sweep stops before its next trial

    with timed_proposers() as proposers:
        start = time.perf_counter()
        try:
            run_sweep(parsed, objective.session, cancel=cancel, on_trial=on_trial)
        except Cancelled:
            run.stopped_early = True
        run.wall_s = sum(durations) if resumable else time.perf_counter() - start
    run.proposer_s = sum(p.seconds for p in proposers)
    return run


def sweep_base(case: Case, objective: MemoObjective) -> dict[str, Any]:
    return {"adapters": case.tasks, "method": "weighted_delta", "split": objective.split,
            "eval_subset": objective.subset.model_dump()}


def run_grid(case: Case, objective: MemoObjective) -> Run:
    points = case.grid()
    config = {**sweep_base(case, objective),
              "search": {"type": "grid", "grid": {"lambda": [case.lam(p) for p in points]}}}
    run = sweep_run(Run("grid", None), config, objective, None, resumable=True)
    log.info("%s grid: %d points, best %.4f (%.1f s)", case.name, len(points), run.best, run.wall_s)
    return run


def run_random(case: Case, objective: MemoObjective, seed: int, threshold: float | None) -> Run:
    run = Run("random", seed)
    rng = random.Random(seed)
    start, charged_before = time.perf_counter(), objective.charged_s
    for _ in range(case.budget):
        value = objective(case.tasks, case.lam(case.random_point(rng)))
        run.add(value, time.perf_counter() - start + objective.charged_s - charged_before)
        if threshold is not None and value >= threshold - EPS:
            run.stopped_early = len(run.objectives) < case.budget
            break
    run.wall_s = time.perf_counter() - start
    log.info("%s random seed %d: %d evaluations, best %.4f, reached at %s", case.name, seed,
             len(run.objectives), run.best, run.reached_at(threshold) if threshold is not None else "-")
    return run


def run_bayes(case: Case, objective: MemoObjective, seed: int, threshold: float | None,
              multi_fidelity: dict[str, Any] | None = None, budget: int | None = None) -> Run:
    search: dict[str, Any] = {"type": "bayes", "budget": budget or case.budget,
                              "init_points": case.init_points, "seed": seed, "space": case.space()}
    top = None
    if multi_fidelity is not None:
        search["multi_fidelity"] = multi_fidelity
        top = multi_fidelity["fidelities"][-1]

    def stop(trial: Trial) -> bool:
        ranked = top is None or trial.fidelity == top
        return threshold is not None and ranked and trial.objective >= threshold - EPS

    name = "bayes" if multi_fidelity is None else "bayes_mf"
    run = sweep_run(Run(name, seed), {**sweep_base(case, objective), "search": search}, objective,
                    stop, top)
    log.info("%s %s seed %d: %d trials (%d at the top fidelity), best %.4f, reached at %s "
             "(%.1f s, proposer %.1f s)", case.name, name, seed, len(run.objectives),
             run.top_evaluations, run.best,
             run.reached_at(threshold) if threshold is not None else "-", run.wall_s, run.proposer_s)
    return run


# ----------------------------------------------------------- botorch multi-fidelity KG (bench)


def mfkg_propose(train_x: torch.Tensor, train_y: torch.Tensor, dims: int, fidelities: list[float],
                 fixed_cost: float, seed: int) -> list[float]:
    """One (point, fidelity) from botorch's multi-fidelity knowledge gradient, as in its
    discrete multi-fidelity tutorial: the cost of an evaluation is `fixed_cost + s` (s, the
    fidelity, as a fraction of the top one), KG's value projected to the top fidelity."""
    from botorch.acquisition import PosteriorMean
    from botorch.acquisition.cost_aware import InverseCostWeightedUtility
    from botorch.acquisition.fixed_feature import FixedFeatureAcquisitionFunction
    from botorch.acquisition.knowledge_gradient import qMultiFidelityKnowledgeGradient
    from botorch.acquisition.utils import project_to_target_fidelity
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskMultiFidelityGP
    from botorch.models.cost import AffineFidelityCostModel
    from botorch.models.transforms.outcome import Standardize
    from botorch.optim.optimize import optimize_acqf, optimize_acqf_mixed
    from gpytorch.mlls import ExactMarginalLogLikelihood

    torch.manual_seed(seed)
    model = SingleTaskMultiFidelityGP(train_x, train_y, outcome_transform=Standardize(m=1),
                                      data_fidelities=[dims])
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    bounds = torch.tensor([[0.0] * (dims + 1), [1.0] * (dims + 1)], dtype=torch.float64)
    target = {dims: 1.0}

    def project(x: torch.Tensor) -> torch.Tensor:
        return project_to_target_fidelity(X=x, target_fidelities=target, d=dims + 1)

    current = FixedFeatureAcquisitionFunction(acq_function=PosteriorMean(model), d=dims + 1,
                                              columns=[dims], values=[1.0])
    _, current_value = optimize_acqf(current, bounds=bounds[:, :-1], q=1, num_restarts=4,
                                     raw_samples=128, options={"batch_limit": 10, "maxiter": 200})
    cost = AffineFidelityCostModel(fidelity_weights={dims: 1.0}, fixed_cost=fixed_cost)
    acquisition = qMultiFidelityKnowledgeGradient(
        model=model, num_fantasies=64, current_value=current_value,
        cost_aware_utility=InverseCostWeightedUtility(cost_model=cost), project=project)
    candidate, _ = optimize_acqf_mixed(
        acquisition, bounds=bounds, fixed_features_list=[{dims: s} for s in fidelities], q=1,
        num_restarts=4, raw_samples=128, options={"batch_limit": 5, "maxiter": 200})
    return [float(v) for v in candidate[0]]


def run_mfkg(case: Case, objective: MemoObjective, seed: int, threshold: float,
             fidelities: list[int], cap_s: float, fixed_cost: float) -> Run:
    """Sobol init points at the lowest fidelity, then one MF-KG proposal per evaluation, until
    a top-fidelity evaluation is within reach, `case.budget` evaluations, or `cap_s` seconds."""
    from torch.quasirandom import SobolEngine

    run = Run("mfkg", seed)
    top = fidelities[-1]
    fractions = [f / top for f in fidelities]
    subsets = {f: (objective.subset if f == top else
                   FidelitySubsetConfig(**objective.subset.model_dump(), fidelity=f)) for f in fidelities}
    xs: list[list[float]] = []
    ys: list[float] = []
    sobol = SobolEngine(case.dims, scramble=True, seed=seed).draw(case.init_points, dtype=torch.float64)
    start, charged_before = time.perf_counter(), objective.charged_s
    for index in range(case.budget):
        elapsed = time.perf_counter() - start + objective.charged_s - charged_before
        if elapsed > cap_s:
            run.stopped_early = True
            break
        if index < case.init_points:
            unit, fraction = [float(v) for v in sobol[index]], fractions[0]
        else:
            proposer_start = time.perf_counter()
            with warnings.catch_warnings(), one_torch_thread():
                warnings.simplefilter("ignore")
                proposal = mfkg_propose(torch.tensor(xs, dtype=torch.float64),
                                        torch.tensor(ys, dtype=torch.float64).unsqueeze(-1),
                                        case.dims, fractions, fixed_cost, seed * 7919 + index)
            run.proposer_s += time.perf_counter() - proposer_start
            unit, fraction = proposal[:-1], min(fractions, key=lambda s: abs(s - proposal[-1]))
        fidelity = fidelities[fractions.index(fraction)]
        point = tuple(case.low + u * (case.high - case.low) for u in unit)
        value = objective(case.tasks, case.lam(point if case.per_adapter else point[0]), subsets[fidelity])
        xs.append([*unit, fraction])
        ys.append(value)
        run.add(value, time.perf_counter() - start + objective.charged_s - charged_before,
                fidelity == top)
        if fidelity == top and value >= threshold - EPS:
            run.stopped_early = index + 1 < case.budget
            break
    run.wall_s = time.perf_counter() - start
    log.info("%s mfkg seed %d: %d evaluations (%d at the top fidelity), best %s, reached at %s "
             "(%.1f s, proposer %.1f s)", case.name, seed, len(run.objectives), run.top_evaluations,
             f"{run.best:.4f}" if run.top_evaluations else "-", run.reached_at(threshold),
             run.wall_s, run.proposer_s)
    return run


# ------------------------------------------------------------------ reload-per-trial grid


@dataclass
class ReloadGrid:
    """The reload-per-trial grid, timed on a sample of its points."""

    seconds: list[float]
    objective_gaps: list[float]  # |script's objective - ours| at each sampled point

    @property
    def per_point_s(self) -> float:
        return statistics.mean(self.seconds)


def reload_picks(case: Case, sample: int) -> list[int]:
    """`sample` grid indices spread over the grid's order."""
    n_points = len(case.grid())
    return sorted({round(i * (n_points - 1) / max(sample - 1, 1)) for i in range(sample)})


def time_reload_grid(case: Case, objective: MemoObjective, grid: Run, picks: Sequence[int]) -> ReloadGrid:
    """What a script user's grid costs per point (`bench/sweep_bench.py`'s baseline: reload,
    PEFT merge, evaluate), on the grid points `picks`, after one warm-up reload. Called twice,
    before and after our searches, so a shared machine's load weighs on both sides alike."""
    from sweep_bench import ForwardTimer, baseline_trial, eval_sets

    session = objective.session
    base_path = session.workspace.base_model_path()
    adapters = {task: session.workspace.adapter_path(task) for task in case.tasks}
    sets = eval_sets(session, case.tasks, objective.split, objective.subset)
    references = {t: session.reference(t, objective.split, objective.subset).primary for t in case.tasks}
    timer = ForwardTimer()
    points = case.grid()
    baseline_trial(base_path, adapters, coefficients(case.lam(points[0]), len(case.tasks)), sets, timer)
    seconds: list[float] = []
    gaps: list[float] = []
    for index in picks:
        weights = coefficients(case.lam(points[index]), len(case.tasks))
        start = time.perf_counter()
        accuracy = baseline_trial(base_path, adapters, weights, sets, timer)
        seconds.append(time.perf_counter() - start)
        script_objective = min(accuracy[t] - references[t] for t in case.tasks)
        gaps.append(abs(script_objective - grid.objectives[index]))
        log.info("reload grid: point %d %s %.2f s, objective %.4f (ours %.4f)", index, points[index],
                 seconds[-1], script_objective, grid.objectives[index])
    return ReloadGrid(seconds, gaps)


# --------------------------------------------------------------------------------- report


@dataclass
class CaseResult:
    case: Case
    grid: Run
    random: list[Run]
    bayes: list[Run]

    @property
    def evaluations(self) -> int:  # real (not memoised) evaluations for this case
        return sum(r.real_evaluations for r in [self.grid, *self.random, *self.bayes])

    @property
    def eval_seconds(self) -> float:
        return sum(r.real_seconds for r in [self.grid, *self.random, *self.bayes])

    @property
    def grid_best(self) -> float:
        return self.grid.best

    @property
    def threshold(self) -> float:
        return self.grid_best - TOLERANCE

    def needed(self, runs: Sequence[Run]) -> list[int | None]:
        return [r.reached_at(self.threshold) for r in runs]

    def goal(self) -> tuple[bool, str]:
        needed = self.needed(self.bayes)
        limit = len(self.grid.objectives) / 3
        if any(n is None for n in needed):
            return False, f"a seed did not reach the threshold within {self.case.budget} trials"
        mean = statistics.mean(n for n in needed if n is not None)
        return mean <= limit, f"mean {mean:.1f} vs grid/3 = {limit:.1f}"


def fmt_needed(values: Sequence[int | None]) -> str:
    return ", ".join("not reached" if v is None else str(v) for v in values)


def fmt_mean(values: Sequence[int | float | None], digits: int = 1) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return "not reached"
    text = f"{statistics.mean(reached):.{digits}f}"
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)} seeds reached)"


def case_tables(result: CaseResult) -> list[str]:
    case = result.case
    n_grid = len(result.grid.objectives)
    lines = [
        f"({case.name})",
        "",
        ("| method | budget | evaluations to within 0.005 of grid best, per seed | mean over seeds "
        "| best objective found, per seed | wall (s), per seed |"),
        "|---|---:|---|---:|---|---|",
        (f"| grid | {n_grid} | {n_grid} (exhaustive; its best defines the threshold) | {n_grid} "
        f"| {result.grid_best:+.4f} | {result.grid.wall_s:.1f} |"),
    ]
    for name, runs in (("random", result.random), ("bayes", result.bayes)):
        if not runs:
            lines.append(f"| {name} | {case.budget} | not run (`--random-seeds-b 0`) | - | - | - |")
            continue
        needed = result.needed(runs)
        lines.append(
            f"| {name} (seeds {', '.join(str(r.seed) for r in runs)}) | {case.budget} "
            f"| {fmt_needed(needed)} | {fmt_mean(needed)} "
            f"| {', '.join(f'{r.best:+.4f}' for r in runs)} "
            f"| {', '.join(f'{r.wall_s:.1f}' for r in runs)} |"
        )
    return lines


def case_details(result: CaseResult) -> list[str]:
    case = result.case
    return [
        f"### ({case.name}) {case.describe()}",
        "",
        (f"Grid best objective (min interference delta, accuracy as a fraction): "
        f"{result.grid_best:+.4f}; threshold = grid best - {TOLERANCE} (0.5 accuracy points) = "
        f"{result.threshold:+.4f}. Real evaluations for this case: {result.evaluations} "
        f"({result.eval_seconds / max(result.evaluations, 1):.2f} s each on average)."),
        "",
    ]


def goal_line(result: CaseResult) -> str:
    passed, detail = result.goal()
    return (f"- Goal ({result.case.name}): bayes needs <= grid/3 evaluations: {detail} -> "
            f"**{'PASS' if passed else 'FAIL'}**")


@dataclass
class TimeToBest:
    result: CaseResult
    reload: ReloadGrid
    bayes_mf: list[Run]
    mfkg: list[Run]
    fidelities: list[int]
    eta: int
    mf_budget: int
    mfkg_cap_s: float

    @property
    def grid_reached(self) -> int:
        reached = self.result.grid.reached_at(self.result.threshold)
        assert reached is not None  # the grid's own best is within reach
        return reached

    @property
    def reload_s(self) -> float:
        return self.grid_reached * self.reload.per_point_s

    def ours(self) -> dict[str, list[Run]]:
        return {"our grid": [self.result.grid], "our bayes": self.result.bayes,
                "our bayes + multi-fidelity": self.bayes_mf}

    def mean_time(self, runs: Sequence[Run]) -> float | None:
        times = [r.time_to(self.result.threshold) for r in runs]
        return None if any(t is None for t in times) else statistics.mean(t for t in times if t is not None)

    def goal(self) -> tuple[bool, str]:
        means = {name: self.mean_time(runs) for name, runs in self.ours().items()}
        reached = {name: t for name, t in means.items() if t is not None}
        if not reached:
            return False, "none of ours reached the threshold on every seed"
        name, best = min(reached.items(), key=lambda item: item[1])
        speedup = self.reload_s / best
        return speedup >= SPEEDUP_GOAL, (f"{name}, mean {best:.1f} s vs {self.reload_s:.1f} s: "
                                         f"{speedup:.1f}x")


def time_table(t2b: TimeToBest) -> list[str]:
    threshold = t2b.result.threshold
    reload = t2b.reload
    k = t2b.grid_reached
    n_grid = len(t2b.result.grid.objectives)
    fidelities = "/".join(map(str, t2b.fidelities))
    lines = [
        ("| search | evaluations until within 0.005 of grid best, per seed | time to within 0.005 (s), "
        "per seed | mean (s) | proposer (s), per seed | sooner than the reload grid |"),
        "|---|---|---|---:|---|---:|",
        (f"| grid, reload per trial (script: load base + adapters with PEFT, merge, evaluate; "
        f"{len(reload.seconds)} points timed, {reload.per_point_s:.2f} s each, x {k}) "
        f"| {k} of {n_grid} (grid order) | {t2b.reload_s:.1f} (extrapolated) | {t2b.reload_s:.1f} | - | 1.0x |"),
    ]
    rows: list[tuple[str, list[Run]]] = [
        (f"our grid (`run_sweep`, resident model; {n_grid} points)", [t2b.result.grid]),
        ((f"our bayes (seeds {', '.join(str(r.seed) for r in t2b.result.bayes)}; budget "
         f"{t2b.result.case.budget})"), t2b.result.bayes),
        ((f"our bayes + multi-fidelity (successive halving; fidelities {fidelities}, eta {t2b.eta}; "
         f"budget {t2b.mf_budget})"), t2b.bayes_mf),
        (f"botorch MF-KG (bench only; fidelities {fidelities}; stops after {t2b.mfkg_cap_s:.0f} s)",
         t2b.mfkg),
    ]
    for label, runs in rows:
        if not runs:
            continue
        needed = []
        for run in runs:
            reached = run.reached_at(threshold)
            needed.append("not reached" if reached is None else
                          f"{reached} ({sum(run.ranked[:reached])} at the top)"
                          if run.method in ("bayes_mf", "mfkg") else str(reached))
        times = [r.time_to(threshold) for r in runs]
        mean = t2b.mean_time(runs)
        lines.append(
            f"| {label} | {', '.join(needed)} "
            f"| {', '.join('not reached' if t is None else f'{t:.1f}' for t in times)} "
            f"| {fmt_mean(times)} "
            f"| {', '.join(f'{r.proposer_s:.1f}' for r in runs) if runs[0].method != 'grid' else '-'} "
            f"| {'-' if mean is None else f'{t2b.reload_s / mean:.1f}x'} |"
        )
    return lines


def time_notes(t2b: TimeToBest) -> list[str]:
    passed, detail = t2b.goal()
    gap = max(t2b.reload.objective_gaps)
    return [
        (f"- Goal: the best of ours >= {SPEEDUP_GOAL:g}x sooner than the reload-per-trial grid: "
        f"{detail} -> **{'PASS' if passed else 'FAIL'}**"),
        (f"- The reload grid's time is its mean time per point ({len(t2b.reload.seconds)} points spread "
        f"over the grid, half before and half after our multi-fidelity searches, each half after one "
        f"warm-up reload) times the {t2b.grid_reached} points the grid "
        f"evaluates, in its order, until its first one within 0.005 of its best; its objective "
        f"at the timed points is ours to {gap:.4f}."),
        ("- Multi-fidelity evaluation counts include every fidelity (in brackets: at the top one); "
        "only a top-fidelity trial counts as reaching the best. Times include the proposer, and "
        "memo hits are charged what their evaluation cost."),
    ]


class Checkpoint:
    """Finished units of work (one search, one seed) in a JSON file, so that a bench killed on
    a shared machine starts again where it stopped (`--checkpoint`); in memory without a path."""

    def __init__(self, path: Path | None, objective: MemoObjective, started: float) -> None:
        self.path = path
        self.objective = objective
        self.data: dict[str, Any] = {"units": {}, "elapsed_s": 0.0, "starts": 0}
        if path is not None and path.is_file():
            self.data = json.loads(path.read_text())
        self.data["starts"] += 1
        self.elapsed_before = self.data["elapsed_s"]
        self.started = started

    def save(self) -> None:
        self.data["elapsed_s"] = self.elapsed_before + time.perf_counter() - self.started
        if self.path is not None:
            temp = self.path.with_suffix(".tmp")
            temp.write_text(json.dumps(self.data))
            temp.replace(self.path)

    def run(self, name: str, compute: Callable[[], Run]) -> Run:
        """The unit's `Run`: read back if an earlier start finished it, else computed now."""
        if name in self.data["units"]:
            log.info("%s: read back from the checkpoint", name)
            return Run(**self.data["units"][name])
        objective = self.objective
        before = (objective.evaluations, objective.seconds, objective.hits)
        run = compute()
        run.real_evaluations = objective.evaluations - before[0]
        run.real_seconds = objective.seconds - before[1]
        run.memo_hits = objective.hits - before[2]
        self.data["units"][name] = asdict(run)
        self.save()
        return run

    def reload(self, name: str, compute: Callable[[], ReloadGrid]) -> ReloadGrid:
        if name in self.data["units"]:
            return ReloadGrid(**self.data["units"][name])
        reload = compute()
        self.data["units"][name] = asdict(reload)
        self.save()
        return reload

    @property
    def runs(self) -> list[dict[str, Any]]:
        return [unit for unit in self.data["units"].values() if "real_evaluations" in unit]


def run_case(case: Case, objective: MemoObjective, checkpoint: Checkpoint, seeds: int,
             full_budget: bool, random_seeds: int | None = None) -> CaseResult:
    grid = checkpoint.run(f"{case.name}/grid", lambda: run_grid(case, objective))
    threshold = None if full_budget else grid.best - TOLERANCE
    random_runs = [checkpoint.run(f"{case.name}/random/{seed}",
                                  lambda seed=seed: run_random(case, objective, seed, threshold))
                   for seed in range(seeds if random_seeds is None else random_seeds)]
    bayes_runs = [checkpoint.run(f"{case.name}/bayes/{seed}",
                                 lambda seed=seed: run_bayes(case, objective, seed, threshold))
                  for seed in range(seeds)]
    return CaseResult(case, grid, random_runs, bayes_runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=DEMO_WORKSPACE, help="workspace.yaml")
    parser.add_argument("--tasks", nargs="+", default=["intent", "banking", "sentiment"],
                        help="adapters of case (b); case (a) uses --pair")
    parser.add_argument("--pair", nargs=2, default=None,
                        help="adapters of case (a) (default: first and last of --tasks)")
    parser.add_argument("--cases", nargs="+", choices=["a", "b"], default=["a", "b"])
    parser.add_argument("--samples", type=int, default=100, help="stratified eval samples per task")
    parser.add_argument("--split", default="train",
                        help="split the objective is measured on (default train: coefficients are "
                             "chosen on train, as in bench/demo_results.py)")
    parser.add_argument("--seeds", type=int, default=3, help="random and bayes seeds 0..S-1")
    parser.add_argument("--grid-a", type=int, default=21, help="grid points for case (a)")
    parser.add_argument("--grid-b", type=int, default=5, help="grid points per axis for case (b)")
    parser.add_argument("--budget-a", type=int, default=None, help="random/bayes budget (a) (default grid size)")
    parser.add_argument("--budget-b", type=int, default=None,
                        help="random/bayes budget (b) (default 40%% of the grid, at most 108)")
    parser.add_argument("--random-seeds-b", type=int, default=None,
                        help="random seeds of case (b) (default --seeds; random never reached its "
                             "threshold there, so each seed costs its whole budget)")
    parser.add_argument("--full-budget", action="store_true",
                        help="run random and bayes to their budget instead of stopping at the threshold")
    parser.add_argument("--no-time-to-best", dest="time_to_best", action="store_false",
                        help="leave out the time-to-best comparison of case (b)")
    parser.add_argument("--fidelities", type=int, nargs="+", default=[20, 100],
                        help="multi-fidelity subset sizes; the last must be --samples")
    parser.add_argument("--eta", type=int, default=3, help="multi-fidelity promotion ratio")
    parser.add_argument("--budget-mf", type=int, default=None,
                        help="multi-fidelity budget, trials at every fidelity (default 2x case (b)'s)")
    parser.add_argument("--reload-sample", type=int, default=10, help="reload-per-trial grid points timed")
    parser.add_argument("--mfkg-seeds", type=int, default=1,
                        help="MF-KG seeds 0..S-1 (0: none; one by default: its proposals take seconds each)")
    parser.add_argument("--mfkg-cap-s", type=float, default=300.0, help="MF-KG seconds per seed at most")
    parser.add_argument("--mfkg-fixed-cost", type=float, default=0.1,
                        help="MF-KG cost model: an evaluation costs this + its fidelity / the top one")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="artifacts dir (default: a new temp dir; with --checkpoint, beside it)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="JSON file of finished searches: a killed run started again with it "
                             "reads them back and goes on (the exhaustive grid resumes its trials)")
    parser.add_argument("--write", action="store_true",
                        help=f"write {display_path(RESULTS)} and the README's tables")
    args = parser.parse_args()
    if args.fidelities[-1] != args.samples:
        parser.error(f"--fidelities must end at --samples ({args.samples})")
    setup_logging(quiet_libraries=True)
    torch.manual_seed(0)

    pair = list(args.pair or [args.tasks[0], args.tasks[-1]])
    grid_b = args.grid_b ** len(args.tasks)
    cases = {
        "a": Case("a", "2 adapters, 1 lambda", pair, 0.0, 1.0, False, axis(0.0, 1.0, args.grid_a), 4,
                  args.budget_a or args.grid_a),
        "b": Case("b", f"{len(args.tasks)} adapters, {len(args.tasks)} lambdas", list(args.tasks), 0.0, 1.5,
                  True, axis(0.0, 1.5, args.grid_b), 8, args.budget_b or min(math.ceil(0.4 * grid_b), 108)),
    }
    subset = EvalSubsetConfig(max_samples=args.samples, stratified=True, seed=0)
    artifacts = args.artifacts or (args.checkpoint.with_name(args.checkpoint.stem + "_artifacts")
                                   if args.checkpoint else Path(mkdtemp(prefix="bo_bench_")))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    session = EvalSession.from_workspace(load_workspace(args.workspace), artifacts, device="cpu")
    objective = MemoObjective(session, args.split, subset)
    # Warm-up: adapters, data, the reference and base metrics of every task on every subset
    # (each computed once and cached on disk; a user pays them once).
    warm_start = time.perf_counter()
    warm_subsets: list[EvalSubsetConfig] = [subset]
    if args.time_to_best and "b" in args.cases:
        warm_subsets += [FidelitySubsetConfig(**subset.model_dump(), fidelity=f) for f in args.fidelities[:-1]]
    for task in dict.fromkeys([*pair, *args.tasks]):
        for warm_subset in warm_subsets:
            session.reference(task, args.split, warm_subset)
            session.base_metrics(task, args.split, warm_subset)
    warm_s = time.perf_counter() - warm_start
    log.info("warm-up (references, base metrics) %.1f s", warm_s)

    checkpoint = Checkpoint(args.checkpoint, objective, started)
    results = {name: run_case(cases[name], objective, checkpoint, args.seeds, args.full_budget,
                              args.random_seeds_b if name == "b" else None) for name in args.cases}
    t2b = None
    if args.time_to_best and "b" in results:
        result = results["b"]
        case = result.case
        picks = reload_picks(case, args.reload_sample)
        before = checkpoint.reload("b/reload/before", lambda: time_reload_grid(
            case, objective, result.grid, picks[::2]))
        multi_fidelity = {"fidelities": list(args.fidelities), "eta": args.eta}
        mf_budget = args.budget_mf or 2 * case.budget
        bayes_mf = [checkpoint.run(f"b/bayes_mf/{seed}", lambda seed=seed: run_bayes(
                        case, objective, seed, result.threshold, multi_fidelity, mf_budget))
                    for seed in range(args.seeds)]
        mfkg = [checkpoint.run(f"b/mfkg/{seed}", lambda seed=seed: run_mfkg(
                    case, objective, seed, result.threshold, list(args.fidelities), args.mfkg_cap_s,
                    args.mfkg_fixed_cost))
                for seed in range(args.mfkg_seeds)]
        after = checkpoint.reload("b/reload/after", lambda: time_reload_grid(
            case, objective, result.grid, picks[1::2]))
        reload = ReloadGrid(before.seconds + after.seconds, before.objective_gaps + after.objective_gaps)
        t2b = TimeToBest(result, reload, bayes_mf, mfkg, list(args.fidelities), args.eta, mf_budget,
                         args.mfkg_cap_s)

    checkpoint.save()
    minutes = checkpoint.data["elapsed_s"] / 60
    starts = checkpoint.data["starts"]
    real_evaluations = sum(run["real_evaluations"] for run in checkpoint.runs)
    memo_hits = sum(run["memo_hits"] for run in checkpoint.runs)
    sizes = {t: len(session.task_data(t, args.split, subset)[0])
             for t in dict.fromkeys([*pair, *args.tasks])}
    references = {t: session.reference(t, args.split, subset).primary for t in sizes}
    search_block: list[str] = []
    lines = [
        "## Bayes vs grid vs random search for merge weights (CPU)",
        "",
        (f"{cpu_line(load_before)}; {versions_line('torch', 'botorch')}; generated {utc_stamp()} UTC "
        f"by `bench/bo_bench.py`; total {minutes:.1f} min"
         + (f" over {starts} starts (`--checkpoint`: an interrupted start's finished searches "
            f"are read back)." if starts > 1 else ".")),
        (f"Workspace `{display_path(args.workspace)}`, split `{args.split}`, stratified subset per task: "
         + ", ".join(f"{t} {n}" for t, n in sizes.items())
         + " (own-adapter accuracy on it: "
         + ", ".join(f"{t} {references[t]:.4f}" for t in sizes)
         + f"). Objective: min over tasks of (merged - own adapter) accuracy, as fractions; "
         f"memoised by merge weights and subset ({real_evaluations} real evaluations, "
         f"{memo_hits} memo hits in all; warm-up {warm_s:.1f} s). Random and bayes "
         + ("run to their budget." if args.full_budget else
            "stop at the first evaluation within 0.005 of the grid's best.")
         + f" Seeds 0..{args.seeds - 1}."),
        "",
    ]
    for result in results.values():
        tables = case_tables(result)
        lines += case_details(result) + tables[2:] + ["", goal_line(result), ""]
        search_block += [*tables, ""]
    search_block += [goal_line(result) for result in results.values()]
    time_block: list[str] = []
    if t2b is not None:
        time_block = [*time_table(t2b), "", *time_notes(t2b)]
        lines += [
            "### Time to best, case (b)",
            "",
            (f"Wall seconds from a search's start until its first evaluation within 0.005 of the grid's "
            f"best ({t2b.result.threshold:+.4f}), the proposer's time included. Multi-fidelity: "
            f"subsets of {', '.join(map(str, t2b.fidelities))} rows per task, each a prefix of the "
            f"top one's fixed order; {args.eta ** (len(t2b.fidelities) - 1)} candidates per bracket "
            f"at {t2b.fidelities[0]}, the best 1/{args.eta} promoted."),
            "",
            *time_block,
            "",
        ]
    publish("\n".join(lines).rstrip() + "\n", RESULTS if args.write else None)
    if args.write:
        replace_marked_block(README, *SEARCH_MARKERS, search_block)
        if time_block:
            replace_marked_block(README, *TIME_MARKERS, time_block)
        print(f"written to {display_path(RESULTS)} and {display_path(README)}")


if __name__ == "__main__":
    main()
