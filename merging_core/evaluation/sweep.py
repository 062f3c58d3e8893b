"""Sweeps over merge coefficients: grid or Bayesian optimisation (botorch), ranked max-min.

Each trial merges in memory, applies the merge on the resident model, evaluates every task,
restores, and is written to disk at once (`sweeps/sweep_<id>/trials/trial_NNNN.json`). The
sweep id is a hash of everything that defines the sweep, so starting the same sweep again with
the same artifacts directory resumes it: finished trials are read back, never re-run, and the
Bayesian proposals are seeded per trial, so the resumed sweep reaches the same best point.

Objective: the min over tasks of the interference delta (higher is better). The summary
`sweeps/sweep_<id>.json` keeps every task's metric for each trial, ranked, with the best point;
`sweeps/sweep_<id>.png` plots the space.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging_core.config.schema import MergeConfig, MergeSpec, SearchConfig
from merging_core.engine.merge import MergeOutput
from merging_core.engine.registry import get_method
from merging_core.engine.runner import prepare_merge
from merging_core.errors import ConfigError, ParamError
from merging_core.evaluation.cancel import CancelToken, Progress, check, report
from merging_core.evaluation.evaluate import EvalSession, subset_namespace
from merging_core.runtime.io import atomic_write_json
from merging_core.runtime.paths import merged_dir

log = logging.getLogger(__name__)
# The in-progress summary is rewritten at most this often (every trial is on disk at once in
# its own file; rewriting the ranked list after each one made long sweeps quadratic).
SUMMARY_INTERVAL_S = 5.0


@dataclass(frozen=True)
class Dimension:
    """One searched coordinate: a method param, optionally per adapter or per layer."""

    param: str
    kind: str
    low: float
    high: float
    adapter: int | None = None
    layer: int | None = None

    @property
    def name(self) -> str:
        if self.layer is not None:
            return f"{self.param}@layer{self.layer}"
        if self.adapter is not None:
            return f"{self.param}[{self.adapter}]"
        return self.param

    def from_unit(self, unit: float) -> float | int:
        value = self.low + float(unit) * (self.high - self.low)
        return int(round(value)) if self.kind == "int" else value

    def to_unit(self, value: float) -> float:
        span = self.high - self.low
        return (float(value) - self.low) / span if span else 0.0

    def contains(self, value: float) -> bool:
        return self.low - 1e-9 <= float(value) <= self.high + 1e-9


def build_dimensions(search: SearchConfig, n_adapters: int, nonnegative: bool) -> list[Dimension]:
    dimensions = []
    for param, space in search.space.items():
        low = max(space.min, 0.0) if nonnegative and param == "lambda" else space.min
        if low > space.max:
            raise ConfigError(f"search.space.{param}: empty range with constraint_nonnegative")
        if space.per_layer:
            dimensions += [Dimension(param, space.type, low, space.max, layer=layer)
                           for layer in space.per_layer]
        elif space.per_adapter:
            dimensions += [Dimension(param, space.type, low, space.max, adapter=i)
                           for i in range(n_adapters)]
        else:
            dimensions.append(Dimension(param, space.type, low, space.max))
    return dimensions


def point_to_merge(
    point: dict[str, Any], dimensions: Sequence[Dimension], config: MergeConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method_params, lambda_policy) for a point of the search space."""
    params = dict(config.method_params)
    policy = config.lambda_policy.model_dump()
    per_adapter: dict[str, dict[int, Any]] = {}
    for dimension in dimensions:
        value = point[dimension.name]
        if dimension.layer is not None:
            policy["type"] = "per_layer"
            policy["overrides"] = {**policy.get("overrides", {}), dimension.layer: value}
        elif dimension.adapter is not None:
            per_adapter.setdefault(dimension.param, {})[dimension.adapter] = value
        else:
            params[dimension.param] = value
    for param, values in per_adapter.items():
        params[param] = [values[i] for i in sorted(values)]
    return params, policy


@dataclass
class Trial:
    index: int
    point: dict[str, Any]
    source: str
    objective: float
    metrics: dict[str, float]
    interference_delta: dict[str, float]
    method_params: dict[str, Any]
    lambda_policy: dict[str, Any]
    merge_tag: str
    eval_id: str
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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


def _context(config: MergeConfig, tasks: Sequence[str]) -> dict[str, Any]:
    return {
        "method": config.method,
        "adapters": list(config.adapters),
        "merge_mode": config.merge_mode,
        "split": config.split,
        "eval_tasks": list(tasks),
        "constraint_nonnegative": config.constraint_nonnegative,
        "eval_subset": subset_namespace(config.eval_subset),
    }


def _sweep_id(config: MergeConfig, context: dict[str, Any]) -> str:
    assert config.search is not None
    search = config.search.model_dump(
        mode="json", exclude={"warm_start_sweeps", "warm_start_max_points"}
    )
    defining = {
        "context": context,
        "search": search,
        "method_params": config.method_params,
        "lambda_policy": config.lambda_policy.model_dump(mode="json"),
        "transforms": [t.model_dump(mode="json") for t in config.transforms],
    }
    digest = hashlib.sha1(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()
    return f"sweep_{digest[:12]}"


def _summary_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        return sorted(path.glob("sweep_*.json"))
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(source))


def load_warm_start(
    search: SearchConfig, context: dict[str, Any], dimensions: Sequence[Dimension], own_summary: Path
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Points from earlier sweeps that match this one; the rest are reported with a reason.
    A summary file named by several sources is read once; this sweep's own summary is skipped
    (its trials are resumed instead)."""
    used: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    names = sorted(d.name for d in dimensions) if dimensions else sorted(search.grid)
    cap = search.warm_start_max_points
    read: set[Path] = {Path(own_summary).resolve()}
    for source in search.warm_start_sweeps:
        files = _summary_files(source)
        if not files:
            skipped.append({"source": source, "reason": "no sweep_*.json found"})
        for path in files:
            if path.resolve() in read:
                continue
            read.add(path.resolve())
            try:
                summary = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                skipped.append({"source": str(path), "reason": f"unreadable: {exc}"})
                continue
            theirs = summary.get("context", {})
            mismatched = [key for key in context if theirs.get(key) != context[key]]
            if mismatched:
                skipped.append({"source": str(path), "reason": f"{', '.join(mismatched)} differ"})
                continue
            for trial in summary.get("trials", []):
                point = trial.get("point", {})
                if sorted(point) != names:
                    skipped.append({"source": f"{path}#trial{trial.get('index')}",
                                    "reason": f"searched {sorted(point)}, not {names}"})
                elif not all(_is_number(point[d.name]) for d in dimensions):
                    skipped.append({"source": f"{path}#trial{trial.get('index')}",
                                    "reason": "a value is not a single number (e.g. per-adapter lists), "
                                              "so it is no point of this search space"})
                elif not all(d.contains(point[d.name]) for d in dimensions):
                    skipped.append({"source": f"{path}#trial{trial.get('index')}",
                                    "reason": "outside the search space"})
                elif cap is not None and len(used) >= cap:
                    skipped.append({"source": f"{path}#trial{trial.get('index')}",
                                    "reason": f"warm_start_max_points={cap} reached"})
                else:
                    used.append(trial)
    return used, skipped


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _suggest(
    observed_x: list[list[float]], observed_y: list[float], dims: int, acquisition: str, seed: int
) -> list[float]:
    """One point in [0, 1]^d from a GP fitted to the observations."""
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
    if acquisition == "qlognei":
        sampler = SobolQMCNormalSampler(sample_shape=torch.Size([128]), seed=seed)
        acq = qLogNoisyExpectedImprovement(model, X_baseline=train_x, sampler=sampler)
    elif acquisition == "logei":
        acq = LogExpectedImprovement(model, best_f=train_y.max())
    else:
        acq = ExpectedImprovement(model, best_f=train_y.max())
    bounds = torch.stack([torch.zeros(dims), torch.ones(dims)]).to(torch.float64)
    candidate, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=8, raw_samples=256)
    return [float(v) for v in candidate[0].clamp(0, 1)]


def _suggest_quietly(*args: Any) -> list[float]:
    # A flat or noisy objective makes the GP fit and the acquisition optimiser warn loudly;
    # the proposal is still valid, so keep those warnings out of the user's terminal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _suggest(*args)


def _grid_points(config: MergeConfig, dimensions: list[Dimension]) -> list[dict[str, Any]]:
    assert config.search is not None
    grid = config.search.grid
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _grid_merge(point: dict[str, Any], config: MergeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    params = dict(config.method_params)
    policy = config.lambda_policy.model_dump()
    for key, value in point.items():
        param, _, layer = key.partition("@layer")
        if layer:
            policy["type"] = "per_layer"
            policy["overrides"] = {**policy.get("overrides", {}), int(layer): value}
        else:
            params[param] = value
    return params, policy


class Sweep:
    """One sweep over a workspace session; `run()` resumes from persisted trials."""

    def __init__(self, config: MergeConfig, session: EvalSession) -> None:
        if config.search is None:
            raise ConfigError("a sweep needs a `search` section (search.type: grid or bayes)")
        self.config = config
        self.search = config.search
        self.session = session
        self.method = get_method(config.method)
        self.tasks = list(config.eval_tasks or [a for a in config.adapters if a in session.workspace.tasks])
        if not self.tasks:
            raise ConfigError("a sweep needs eval_tasks, or adapters that are workspace tasks")
        for task in self.tasks:
            session.workspace.task(task)
        self.context = _context(config, self.tasks)
        self.sweep_id = _sweep_id(config, self.context)
        self.dimensions = (
            build_dimensions(self.search, len(config.adapters), config.constraint_nonnegative)
            if self.search.type == "bayes" else []
        )
        for dimension in self.dimensions:
            if dimension.param not in self.method.param_index:
                raise ParamError(
                    f"search.space.{dimension.param}: method {self.method.name!r} has no such "
                    f"parameter; it has: {', '.join(self.method.param_index) or 'none'}"
                )
        self.sweeps_dir = merged_dir(session.root, config.method, config.adapters) / "sweeps"
        self.trials_dir = self.sweeps_dir / self.sweep_id / "trials"
        self.summary_path = self.sweeps_dir / f"{self.sweep_id}.json"
        self.plot_path = self.sweeps_dir / f"{self.sweep_id}.png"
        self._validate_points()

    def _spec(self, params: dict[str, Any], policy: dict[str, Any]) -> MergeSpec:
        data = self.config.to_spec().model_dump()
        data.update(method_params=params, lambda_policy=policy)
        return MergeSpec.model_validate(data)

    def _merge_for(self, point: dict[str, Any]) -> MergeOutput:
        if self.search.type == "grid":
            params, policy = _grid_merge(point, self.config)
        else:
            params, policy = point_to_merge(point, self.dimensions, self.config)
        return prepare_merge(
            self._spec(params, policy), task_registry=self.session.workspace.task_registry(),
            adapter_cache=self.session.adapter_cache,
        )

    def _validate_points(self) -> None:
        """Every grid point (or both corners of the space) must be a valid merge up front."""
        if self.search.type == "grid":
            points = _grid_points(self.config, [])
        else:
            points = [{d.name: d.from_unit(u) for d in self.dimensions} for u in (0.0, 1.0)]
        for point in points:
            self._merge_for(point)

    @property
    def total(self) -> int:
        if self.search.type == "grid":
            return len(_grid_points(self.config, []))
        return self.search.budget

    def _trial_path(self, index: int) -> Path:
        return self.trials_dir / f"trial_{index:04d}.json"

    def _load_trial(self, index: int) -> Trial | None:
        path = self._trial_path(index)
        if not path.is_file():
            return None
        return Trial(**json.loads(path.read_text()))

    def _evaluate(self, index: int, point: dict[str, Any], source: str,
                  cancel: CancelToken | None) -> Trial:
        started = time.perf_counter()
        output = self._merge_for(point)
        tag = output.merge_tag
        eval_id = f"{self.sweep_id}/trial_{index:04d}"
        result = self.session.evaluate_merge(
            output, merge_tag=tag, tasks=self.tasks, split=self.config.split,
            subset=self.config.eval_subset, entry_id=eval_id,
            record={"sweep_id": self.sweep_id, "trial": index}, cancel=cancel,
        )
        trial = Trial(
            index=index, point=point, source=source, objective=result.objective,
            metrics=result.metrics, interference_delta=result.deltas,
            method_params=output.params, lambda_policy=output.policy.describe(output.params.get("lambda")),
            merge_tag=tag, eval_id=eval_id, duration_s=round(time.perf_counter() - started, 4),
        )
        atomic_write_json(self._trial_path(index), trial.to_dict())
        return trial

    def run(
        self,
        *,
        cancel: CancelToken | None = None,
        progress: Progress | None = None,
        on_trial: Callable[[Trial], None] | None = None,
    ) -> SweepResult:
        """Run or resume; `on_trial` sees every trial once it is on disk (resumed ones too)."""
        warm, skipped = ([], [])
        if self.search.warm_start_sweeps:
            warm, skipped = load_warm_start(self.search, self.context, self.dimensions, self.summary_path)
        trials: list[Trial] = []
        resumed = 0
        total = self.total
        best: Trial | None = None
        summary_written = float("-inf")

        def progressed(trial: Trial) -> None:
            nonlocal best
            if on_trial is not None:
                on_trial(trial)
            if best is None or trial.objective > best.objective:
                best = trial
            report(progress, len(trials), total, f"trial {trial.index} objective {trial.objective:.4f}",
                   best={"index": best.index, "objective": best.objective, "point": best.point})

        grid = _grid_points(self.config, []) if self.search.type == "grid" else []
        warm_by_point = {json.dumps(t["point"], sort_keys=True): t for t in warm}
        sobol = None
        n_sobol = max(0, self.search.init_points - len(warm))
        if self.search.type == "bayes" and n_sobol:
            from torch.quasirandom import SobolEngine

            sobol = SobolEngine(len(self.dimensions), scramble=True, seed=self.search.seed).draw(
                n_sobol, dtype=torch.float64
            ).tolist()
        for index in range(total):
            check(cancel)
            existing = self._load_trial(index)
            if existing is not None:
                trials.append(existing)
                resumed += 1
                progressed(existing)
                continue
            if self.search.type == "grid":
                point, source = grid[index], "grid"
                reusable = warm_by_point.get(json.dumps(point, sort_keys=True))
                if reusable is not None:
                    trial = Trial(**{**reusable, "index": index, "source": "warm_start"})
                    atomic_write_json(self._trial_path(index), trial.to_dict())
                    trials.append(trial)
                    progressed(trial)
                    continue
            elif sobol is not None and index < n_sobol:
                point = {d.name: d.from_unit(u) for d, u in zip(self.dimensions, sobol[index])}
                source = "sobol"
            else:
                observed = [*warm, *(t.to_dict() for t in trials)]
                unit = _suggest_quietly(
                    [[d.to_unit(o["point"][d.name]) for d in self.dimensions] for o in observed],
                    [o["objective"] for o in observed],
                    len(self.dimensions), self.search.acquisition, self.search.seed * 7919 + index,
                )
                point = {d.name: d.from_unit(u) for d, u in zip(self.dimensions, unit)}
                source = "gp"
            trial = self._evaluate(index, point, source, cancel)
            trials.append(trial)
            progressed(trial)
            if time.monotonic() - summary_written >= SUMMARY_INTERVAL_S:
                self._write_summary(trials, warm, skipped, complete=False)
                summary_written = time.monotonic()
        result = SweepResult(
            sweep_id=self.sweep_id, summary_path=self.summary_path, plot_path=None, trials=trials,
            warm_start={"used": self._warm_used(trials, warm), "skipped": skipped}, resumed_trials=resumed,
        )
        self._write_summary(trials, warm, skipped, complete=True)
        result.plot_path = self._plot(trials)
        return result

    def _warm_used(self, trials: list[Trial], warm: list[dict[str, Any]]) -> int:
        """Warm-start points that counted: a grid reuses those on its grid; bayes observes all."""
        if self.search.type == "grid":
            return sum(trial.source == "warm_start" for trial in trials)
        return len(warm)

    def _write_summary(self, trials: list[Trial], warm: list[dict[str, Any]],
                       skipped: list[dict[str, str]], *, complete: bool) -> None:
        ranked = sorted(trials, key=lambda t: (-t.objective, t.index))
        atomic_write_json(self.summary_path, {
            "sweep_id": self.sweep_id,
            "context": self.context,
            "search": self.search.model_dump(mode="json"),
            "dimensions": [d.name for d in self.dimensions] or list(self.search.grid),
            "objective": "min over tasks of interference_delta (higher is better)",
            "complete": complete,
            "num_trials": len(trials),
            "best": ranked[0].to_dict() if ranked else None,
            "trials": [t.to_dict() for t in ranked],
            "warm_start": {"used": self._warm_used(trials, warm), "skipped": skipped},
            "plot": self.plot_path.name,
        })

    def _plot(self, trials: list[Trial]) -> Path | None:
        from merging_core.evaluation.plot import plot_sweep

        try:
            plot_sweep(trials, self.tasks, self.plot_path)
        except ValueError as exc:  # e.g. non-numeric grid values: nothing to draw
            log.warning("no sweep plot: %s", exc)
            return None
        return self.plot_path


def run_sweep(
    config: MergeConfig,
    session: EvalSession,
    *,
    cancel: CancelToken | None = None,
    progress: Progress | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> SweepResult:
    """Run (or resume) the sweep that `config.search` describes."""
    return Sweep(config, session).run(cancel=cancel, progress=progress, on_trial=on_trial)
