"""Bayes vs grid vs random search for merge coefficients on a real workspace (CPU).

Objective: the sweeps' max-min objective, min over the merged tasks of the interference delta
(merged accuracy - the task's own adapter's accuracy; higher is better), on a stratified subset
of each task's split. Metrics are fractions, so "within 0.5 points" means within 0.005 of the
grid's best objective in accuracy units.

Cases (weighted_delta, the dense sum_i w_i * delta_i):

* (a) 2 adapters (default intent, sentiment), 1 lambda: weights (lambda, 1 - lambda),
  lambda in [0, 1]; grid of 21 points.
* (b) 3 adapters (default intent, banking, sentiment), one lambda per adapter in [0, 1.5]; grid
  of 5^3 = 125 points by default (`--grid-b 6` gives 6^3 = 216; an evaluation of 3 tasks x 100
  samples takes a few seconds on 2 shared CPU cores, so 5^3 keeps the run near 40 minutes).

Grid: evaluated once, exhaustively. Random: uniform points with seeds 0..S-1. Bayes: our
`search.type: bayes` sweep (`run_sweep`, botorch GP, Sobol init points) with seeds 0..S-1. Every
objective is memoised by merge weights (also inside the bayes sweeps), so a point that random
or bayes proposes and the grid already evaluated is not evaluated again; the evaluation still
counts for the method that proposed it. Random and bayes stop at the first evaluation within
0.005 of the grid's best (that is the number reported) or at their budget, unless
`--full-budget` is given.

Reported per method: evaluations needed to come within 0.005 of the grid's best (per seed, and
the mean over seeds; "not reached" if never within budget). Goal: bayes needs no more than a
third of the grid's evaluations (every seed reaches the threshold and the mean over seeds is at
most grid/3).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bo_bench.py            # demo workspace, prints
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bo_bench.py --write    # also writes
                                                                  # bench/results/bo_bench_cpu.md
    python scripts/make_tiny_workspace.py /tmp/tinyws                # a quick smoke run:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bo_bench.py --workspace /tmp/tinyws/workspace.yaml \\
        --tasks topic mood --grid-b 4 --budget-b 8 --seeds 2

No number in the output is typed by hand.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

# Before torch: importing common puts the checkout on sys.path and Hugging Face offline.
from common import (RESULTS_DIR, ROOT, cpu_line, display_path, publish, setup_logging, utc_stamp,
                    versions_line)

import torch

from merging_core.config import EvalSubsetConfig, parse_merge_config
from merging_core.engine.merge import MergeOutput
from merging_core.engine.runner import prepare_merge
from merging_core.errors import Cancelled
from merging_core.runtime.cancel import CancelToken
from merging_core.evaluation.evaluate import EvalSession, EvaluationResult, subset_namespace
from merging_core.search import Trial, run_sweep
from merging_core.evaluation.workspace import load_workspace
from merging_core.methods.weighted_delta import coefficients

# The tokenizers library reads this when it tokenises, not at import, so here is in time.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_WORKSPACE = ROOT / "workspaces" / "demo" / "workspace.yaml"
RESULTS = RESULTS_DIR / "bo_bench_cpu.md"
TOLERANCE = 0.005  # 0.5 accuracy points; metrics are fractions
EPS = 1e-9  # float noise in objective comparisons

log = logging.getLogger("bo_bench")

Point = float | tuple[float, ...]


# ------------------------------------------------------------------------------ objective


class MemoObjective:
    """`session.evaluate_merge`, memoised by (adapters, merge weights, split, subset).

    Installed on the session, so the bayes sweeps go through the same memo as grid and random.
    """

    def __init__(self, session: EvalSession, split: str, subset: EvalSubsetConfig) -> None:
        self.session = session
        self.split = split
        self.subset = subset
        self._real = session.evaluate_merge
        self.cache: dict[tuple[Any, ...], EvaluationResult] = {}
        self.evaluations = 0  # real ones
        self.hits = 0
        self.seconds = 0.0  # spent in real evaluations
        session.evaluate_merge = self.evaluate_merge  # type: ignore[method-assign]

    @staticmethod
    def key(output: MergeOutput, split: str, subset: EvalSubsetConfig | None) -> tuple[Any, ...]:
        weights = coefficients(output.params["lambda"], len(output.adapters))
        return (output.method.name, tuple(output.adapter_names),
                tuple(round(w, 9) for w in weights), split, subset_namespace(subset))

    def evaluate_merge(self, output: MergeOutput, **kwargs: Any) -> EvaluationResult:
        key = self.key(output, kwargs.get("split", "test"), kwargs.get("subset"))
        if key in self.cache:
            self.hits += 1
            return self.cache[key]
        start = time.perf_counter()
        result = self._real(output, **kwargs)
        self.seconds += time.perf_counter() - start
        self.evaluations += 1
        self.cache[key] = result
        return result

    def __call__(self, tasks: Sequence[str], lam: float | list[float]) -> float:
        output = prepare_merge(
            {"adapters": list(tasks), "method": "weighted_delta", "method_params": {"lambda": lam}},
            task_registry=self.session.workspace.task_registry(),
            adapter_cache=self.session.adapter_cache,
        )
        result = self.session.evaluate_merge(output, merge_tag="bo_bench", tasks=list(tasks),
                                             split=self.split, subset=self.subset, write=False)
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

    def describe(self) -> str:
        grid = (f"{len(self.grid_axis)} points" if not self.per_adapter
                else f"{len(self.grid_axis)}^{self.dims} = {len(self.grid())} points")
        return (f"{self.title}: adapters {', '.join(self.tasks)}; weighted_delta "
                + ("lambda in [%g, %g] (weights lambda, 1 - lambda)" % (self.low, self.high)
                   if not self.per_adapter else
                   f"one lambda per adapter in [{self.low:g}, {self.high:g}]")
                + f"; grid {grid} (axis {', '.join(f'{x:g}' for x in self.grid_axis)}); "
                f"random/bayes budget {self.budget}, bayes init_points {self.init_points}")


def axis(low: float, high: float, n: int) -> list[float]:
    return [round(low + (high - low) * i / (n - 1), 9) for i in range(n)]


# ------------------------------------------------------------------------------- searches


@dataclass
class Run:
    """One search run (one seed) of one method."""

    method: str
    seed: int | None
    objectives: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    stopped_early: bool = False

    def reached_at(self, threshold: float) -> int | None:
        for index, value in enumerate(self.objectives, start=1):
            if value >= threshold - EPS:
                return index
        return None

    @property
    def best(self) -> float:
        return max(self.objectives)


def run_grid(case: Case, objective: MemoObjective) -> Run:
    run = Run("grid", None)
    start = time.perf_counter()
    points = case.grid()
    for done, point in enumerate(points, start=1):
        run.objectives.append(objective(case.tasks, case.lam(point)))
        if done % 25 == 0 or done == len(points):
            log.info("%s grid: %d/%d, best %.4f", case.name, done, len(points), run.best)
    run.wall_s = time.perf_counter() - start
    return run


def run_random(case: Case, objective: MemoObjective, seed: int, threshold: float | None) -> Run:
    run = Run("random", seed)
    rng = random.Random(seed)
    start = time.perf_counter()
    for _ in range(case.budget):
        run.objectives.append(objective(case.tasks, case.lam(case.random_point(rng))))
        if threshold is not None and run.objectives[-1] >= threshold - EPS:
            run.stopped_early = len(run.objectives) < case.budget
            break
    run.wall_s = time.perf_counter() - start
    log.info("%s random seed %d: %d evaluations, best %.4f, reached at %s", case.name, seed,
             len(run.objectives), run.best, run.reached_at(threshold) if threshold is not None else "-")
    return run


def run_bayes(case: Case, objective: MemoObjective, seed: int, threshold: float | None) -> Run:
    run = Run("bayes", seed)
    config = parse_merge_config({
        "adapters": case.tasks, "method": "weighted_delta", "split": objective.split,
        "eval_subset": objective.subset.model_dump(),
        "search": {"type": "bayes", "budget": case.budget, "init_points": case.init_points,
                   "seed": seed, "space": {"lambda": {"min": case.low, "max": case.high,
                                                      "per_adapter": case.per_adapter}}},
    })
    cancel = CancelToken()
    trials: list[Trial] = []

    def on_trial(trial: Trial) -> None:
        trials.append(trial)
        if threshold is not None and trial.objective >= threshold - EPS:
            cancel.cancel()  # the sweep stops before its next trial

    start = time.perf_counter()
    try:
        result = run_sweep(config, objective.session, cancel=cancel, on_trial=on_trial)
        if result.resumed_trials:
            raise RuntimeError("the bayes sweep resumed earlier trials; use a fresh artifacts dir")
    except Cancelled:
        run.stopped_early = True
    run.wall_s = time.perf_counter() - start
    run.objectives = [t.objective for t in sorted(trials, key=lambda t: t.index)]
    log.info("%s bayes seed %d: %d trials, best %.4f, reached at %s (%.1f s)", case.name, seed,
             len(run.objectives), run.best, run.reached_at(threshold) if threshold is not None else "-",
             run.wall_s)
    return run


# --------------------------------------------------------------------------------- report


@dataclass
class CaseResult:
    case: Case
    grid: Run
    random: list[Run]
    bayes: list[Run]
    evaluations: int  # real (not memoised) evaluations for this case
    eval_seconds: float

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


def fmt_mean(values: Sequence[int | None]) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return "not reached"
    text = f"{statistics.mean(reached):.1f}"
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)} seeds reached)"


def case_lines(result: CaseResult) -> list[str]:
    case = result.case
    n_grid = len(result.grid.objectives)
    lines = [
        f"### ({case.name}) {case.describe()}",
        "",
        f"Grid best objective (min interference delta, accuracy as a fraction): "
        f"{result.grid_best:+.4f}; threshold = grid best - {TOLERANCE} (0.5 accuracy points) = "
        f"{result.threshold:+.4f}. Real evaluations for this case: {result.evaluations} "
        f"({result.eval_seconds / max(result.evaluations, 1):.2f} s each on average).",
        "",
        "| method | budget | evaluations to within 0.005 of grid best, per seed | mean over seeds "
        "| best objective found, per seed | wall (s), per seed |",
        "|---|---:|---|---:|---|---|",
        f"| grid | {n_grid} | {n_grid} (exhaustive; its best defines the threshold) | {n_grid} "
        f"| {result.grid_best:+.4f} | {result.grid.wall_s:.1f} |",
    ]
    for name, runs in (("random", result.random), ("bayes", result.bayes)):
        needed = result.needed(runs)
        lines.append(
            f"| {name} (seeds {', '.join(str(r.seed) for r in runs)}) | {case.budget} "
            f"| {fmt_needed(needed)} | {fmt_mean(needed)} "
            f"| {', '.join(f'{r.best:+.4f}' for r in runs)} "
            f"| {', '.join(f'{r.wall_s:.1f}' for r in runs)} |"
        )
    passed, detail = result.goal()
    lines += ["", f"- Goal ({case.name}): bayes needs <= grid/3 evaluations: {detail} -> "
              f"**{'PASS' if passed else 'FAIL'}**"]
    return lines


def run_case(case: Case, objective: MemoObjective, seeds: int, full_budget: bool) -> CaseResult:
    evaluations, seconds = objective.evaluations, objective.seconds
    grid = run_grid(case, objective)
    threshold = None if full_budget else grid.best - TOLERANCE
    random_runs = [run_random(case, objective, seed, threshold) for seed in range(seeds)]
    bayes_runs = [run_bayes(case, objective, seed, threshold) for seed in range(seeds)]
    return CaseResult(case, grid, random_runs, bayes_runs, objective.evaluations - evaluations,
                      objective.seconds - seconds)


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
    parser.add_argument("--full-budget", action="store_true",
                        help="run random and bayes to their budget instead of stopping at the threshold")
    parser.add_argument("--artifacts", type=Path, default=None, help="artifacts dir (default: a new temp dir)")
    parser.add_argument("--write", action="store_true", help=f"write {display_path(RESULTS)}")
    args = parser.parse_args()
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
    artifacts = args.artifacts or Path(mkdtemp(prefix="bo_bench_"))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    session = EvalSession.from_workspace(load_workspace(args.workspace), artifacts, device="cpu")
    objective = MemoObjective(session, args.split, subset)
    # Warm-up: adapters, data, the reference and base metrics of every task (cached once).
    warm_start = time.perf_counter()
    for task in dict.fromkeys([*pair, *args.tasks]):
        session.reference(task, args.split, subset)
        session.base_metrics(task, args.split, subset)
    warm_s = time.perf_counter() - warm_start
    log.info("warm-up (references, base metrics) %.1f s", warm_s)

    results = [run_case(cases[name], objective, args.seeds, args.full_budget) for name in args.cases]
    minutes = (time.perf_counter() - started) / 60
    sizes = {t: len(session.task_data(t, args.split, subset)[0])
             for t in dict.fromkeys([*pair, *args.tasks])}
    references = {t: session.reference(t, args.split, subset).primary for t in sizes}
    lines = [
        "## Bayes vs grid vs random search for merge weights (CPU)",
        "",
        f"{cpu_line(load_before)}; {versions_line('torch')}; generated {utc_stamp()} UTC "
        f"by `bench/bo_bench.py`; total {minutes:.1f} min.",
        f"Workspace `{display_path(args.workspace)}`, split `{args.split}`, stratified subset per task: "
        + ", ".join(f"{t} {n}" for t, n in sizes.items())
        + " (own-adapter accuracy on it: "
        + ", ".join(f"{t} {references[t]:.4f}" for t in sizes)
        + f"). Objective: min over tasks of (merged - own adapter) accuracy, as fractions; "
        f"memoised by merge weights ({objective.evaluations} real evaluations, {objective.hits} "
        f"memo hits in all; warm-up {warm_s:.1f} s). Random and bayes "
        + ("run to their budget." if args.full_budget else
           "stop at the first evaluation within 0.005 of the grid's best.")
        + f" Seeds 0..{args.seeds - 1}.",
        "",
    ]
    verdicts = []
    for result in results:
        lines += case_lines(result) + [""]
        verdicts.append(result.goal()[0])
    publish("\n".join(lines).rstrip() + "\n", RESULTS if args.write else None)
    if args.write:
        print(f"written to {display_path(RESULTS)}")


if __name__ == "__main__":
    main()
