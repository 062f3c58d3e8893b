"""`optimizer: bayes`, as the seed lists it: a short Bayesian search, then a merge with its best.

On a direct merge (`POST /merges`, `lora-merge merge --workspace`), the optimizer runs a
`search.type: bayes` sweep of the same adapters and method through the sweep machinery (the
resident model, Sobol points then the GP, every trial persisted and resumable like any sweep),
scored on `split` (default `train`) and `search_subset`, then hands the best trial's method
params and lambda policy back to the runner, which re-plans them like a sweep's trial and
merges. `search_subset` is not the request's `eval_subset`: that one still decides how the
final merge is evaluated. The run bundle gets `bayes_trials.json` (every trial) and
`bayes_search.png` (the sweep's plot), and its metadata names the sweep.

Selecting on the test split and then reporting the test score of the selection overstates it
(the best of `budget` noisy scores is biased upwards), so the split defaults to `train`.

It lives here, above the evaluation session, because it runs a sweep; it registers itself in
the optimizer registry (`plugins/optimizers.register_optimizer`) when this package is imported.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from merging_core.config.loader import parse_merge_config
from merging_core.config.schema import EvalSubsetConfig, SearchParamSpace
from merging_core.errors import ConfigError, ParamError
from merging_core.evaluation.evaluate import EvalSession
from merging_core.params import ParamKind, ParamSpec, Params
from merging_core.plugins.optimizer_base import OptimizerContext, OptimizerResult, OptimizerSpec
from merging_core.plugins.optimizers import register_optimizer
from merging_core.search.sweep import run_sweep

log = logging.getLogger(__name__)

DEFAULT_SPACE: dict[str, Any] = {"lambda": {"min": 0.0, "max": 1.5, "per_adapter": True}}
DEFAULT_SEARCH_SUBSET: dict[str, Any] = {"max_samples": 200, "stratified": True, "seed": 0}

PARAMS = (
    ParamSpec("budget", ParamKind.INT, "trials of the search", 12, 1, 10_000),
    ParamSpec("init_points", ParamKind.INT, "Sobol points before the GP", 6, 1, 10_000),
    ParamSpec("space", ParamKind.OBJECT,
              "search.space as in a sweep (default: one lambda per adapter in [0, 1.5])", DEFAULT_SPACE),
    ParamSpec("search_subset", ParamKind.OBJECT,
              "eval subset the trials are scored on (default: 200 stratified rows per task); the "
              "request's eval_subset still decides how the final merge is evaluated", DEFAULT_SEARCH_SUBSET),
    ParamSpec("split", ParamKind.STRING, "split the trials are scored on (test would overstate the result)",
              "train"),
    ParamSpec("seed", ParamKind.INT, "seed of the Sobol points and the GP", 0, 0),
)


def _validate(params: Params) -> None:
    try:
        for name, space in params["space"].items():
            SearchParamSpace.model_validate(space)
        EvalSubsetConfig.model_validate(params["search_subset"])
    except (ValidationError, AttributeError) as exc:
        raise ValueError(f"space or search_subset: {exc}") from None
    if params["init_points"] > params["budget"]:
        raise ValueError("init_points must not exceed budget")


def search_config(ctx: OptimizerContext, params: Params) -> dict[str, Any]:
    """The sweep this optimizer runs: the merge's adapters, method and params, searched over
    `space` on `split` and `search_subset`, evaluated on every merged task."""
    tasks = [adapter.name for adapter in ctx.adapters]
    policy: dict[str, Any] = {"type": ctx.policy.kind}
    if ctx.policy.overrides:
        policy["overrides"] = dict(ctx.policy.overrides)
    return {
        "adapters": tasks,
        "method": ctx.method,
        "method_params": dict(ctx.method_params),
        "lambda_policy": policy,
        "eval_tasks": tasks,
        "split": params["split"],
        "eval_subset": params["search_subset"],
        "search": {"type": "bayes", "budget": params["budget"], "init_points": params["init_points"],
                   "seed": params["seed"], "space": params["space"]},
    }


def run(ctx: OptimizerContext, params: Params) -> OptimizerResult:
    session = ctx.session
    if not isinstance(session, EvalSession):
        raise ParamError(
            "optimizer 'bayes' scores merges on the workspace's tasks: run it with a workspace "
            "(lora-merge merge --workspace ..., or through the service)"
        )
    try:
        config = parse_merge_config(search_config(ctx, params))
    except ConfigError as exc:
        raise ParamError(f"optimizer 'bayes': {exc}") from exc
    result = run_sweep(config, session, cancel=ctx.cancel, progress=ctx.progress)
    best = result.best
    log.info("optimizer bayes: best of %d trials is %s (objective %+.4f)", len(result.trials), best.point,
             best.objective)
    artifacts: dict[str, Any] = {"bayes_trials.json": {
        "sweep_id": result.sweep_id, "best_index": best.index, "trials": [t.to_dict() for t in result.trials]}}
    if result.plot_path is not None and result.plot_path.is_file():
        artifacts["bayes_search.png"] = result.plot_path.read_bytes()
    return OptimizerResult(
        policy=ctx.policy,
        artifacts=artifacts,
        summary={"sweep_id": result.sweep_id, "trials": len(result.trials), "best_index": best.index,
                 "best_point": best.point, "best_objective": best.objective, "split": params["split"]},
        variant=(dict(best.method_params), dict(best.lambda_policy)),
    )


BAYES = register_optimizer(OptimizerSpec(
    "bayes",
    "a short Bayesian search over the merge's coefficients (a sweep), then the merge with its best point",
    PARAMS,
    run,
    params_validator=_validate,
    needs_tasks=True,  # every adapter's task data scores the trials
    # The search sets the lambdas: a request need not give any.
    initial_lambda=lambda params, n_adapters: [1.0] * n_adapters,
))
