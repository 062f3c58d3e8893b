"""Plan, then execute: what a merge request means, decided once and without side effects.

`plan_merge(config, registry)` resolves the method, validates its parameters, builds the
lambda policy, validates the transforms and the optimizer (and checks that the optimizer can
run this plan), resolves the adapter paths and checks the adapters' LoRA factors (loaded once
through an `AdapterCache`, so NaN/Inf weights and shape mismatches are refused up front). It
never builds a dense delta, never touches a model and never runs an optimizer, so the HTTP
layer validates a request with it in milliseconds.

A `MergePlan` is frozen and picklable (names and validated values only, no tensors and no
registry objects), so a worker in another process can execute it. `plan_variant` re-plans the
parameters and policy of an existing plan (a sweep's trial) without touching the adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from merging_core.adapters import (
    AdapterCache,
    LoraAdapter,
    check_compatible,
    check_layer_keys,
    resolve_adapter_specs,
)
from merging_core.config.loader import parse_merge_config
from merging_core.config.schema import LambdaPolicyConfig, MergeConfig
from merging_core.engine.registry import MergeMethod, get_method
from merging_core.errors import IncompatibleAdaptersError, ParamError
from merging_core.params import Params
from merging_core.plugins.optimizers import build_optimizer, get_optimizer
from merging_core.plugins.transforms import build_transform
from merging_core.policies import LambdaPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PluginRef:
    """A transform or optimizer by name, with its validated parameters."""

    name: str
    params: Params = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


@dataclass(frozen=True)
class AdapterRef:
    """An adapter by name and absolute directory."""

    name: str
    path: Path


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge needs, resolved and validated; executing it loads and computes."""

    config: MergeConfig  # the request as parsed (evaluation settings, provenance)
    method: str
    params: Params
    policy: LambdaPolicy
    transforms: tuple[PluginRef, ...]
    optimizer: PluginRef
    adapters: tuple[AdapterRef, ...]
    modules: tuple[str, ...]
    left_out: Mapping[str, list[str]]

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]


def _method_params(config: MergeConfig, method: MergeMethod, initial_lambda: list[float] | None) -> Params:
    params = dict(config.method_params)
    # A policy default stands in for method_params.lambda.
    if config.lambda_policy.default is not None:
        if "lambda" in params and params["lambda"] != config.lambda_policy.default:
            raise ParamError(
                "method_params.lambda and lambda_policy.default disagree; set only one"
            )
        params["lambda"] = config.lambda_policy.default
    # An optimizer that sets the lambdas needs none from the request: it starts from its own.
    if initial_lambda is not None and "lambda" in method.param_index and "lambda" not in params:
        params["lambda"] = initial_lambda
    return method.normalize_params(params, len(config.adapters))


def _build_policy(
    config: LambdaPolicyConfig, method: MergeMethod, params: Params, n_adapters: int
) -> LambdaPolicy:
    if config.type == "scalar" and config.default is None:
        return LambdaPolicy()
    spec = method.param_index.get("lambda")
    if spec is None:
        raise ParamError(
            f"lambda_policy {config.type!r} needs a method with a `lambda` parameter; "
            f"{method.name!r} has none"
        )
    owner = f"lambda_policy.overrides for method {method.name!r}"
    overrides = {}
    for layer, value in config.overrides.items():  # int or stack layer keys ("decoder.3")
        overrides[layer] = spec.validate(f"{owner} (layer {layer})", value, n_adapters)
        if method.params_validator is not None:
            try:
                method.params_validator({**params, "lambda": overrides[layer]}, n_adapters)
            except ValueError as exc:
                raise ParamError(f"{owner} (layer {layer}): {exc}") from exc
    return LambdaPolicy(kind=config.type, overrides=overrides)


def _check_method_fits(method: MergeMethod, transforms: tuple[PluginRef, ...],
                       adapters: list[LoraAdapter], modules: list[str]) -> None:
    if method.space != "delta" and any(t.name != "identity" for t in transforms):
        raise ParamError(
            f"method {method.name!r} works on LoRA factors; transforms act on dense "
            "deltas, so use a delta-space method (e.g. weighted_delta) with transforms"
        )
    if method.same_rank:
        unequal = [m for m in modules if len({a.modules[m].rank for a in adapters}) > 1]
        if unequal:
            raise IncompatibleAdaptersError(
                f"method {method.name!r} needs equal ranks in every module; ranks differ "
                f"in {', '.join(unequal[:5])}; use weighted_delta for adapters of different ranks"
            )


def check_grams_available(method: MergeMethod, adapter_names: list[str],
                          task_evaluators: Mapping[str, str] | None) -> None:
    """Refuse a data-aware method (one that needs Grams) without the resident model and the
    workspace's task data, or with an adapter that is not a workspace task."""
    if not method.needs_grams:
        return
    if task_evaluators is None:
        raise ParamError(
            f"method {method.name!r} needs the resident model and the workspace's task data (it "
            "collects each task's layer inputs): run it on a workspace's session (the service, "
            "lora-merge evaluate --workspace ..., or run_merge(..., session=EvalSession(...)))"
        )
    strangers = [name for name in adapter_names if name not in task_evaluators]
    if strangers:
        raise ParamError(
            f"method {method.name!r} collects Grams on each adapter's own task data; adapter(s) "
            f"{', '.join(map(repr, strangers))} are not workspace tasks (tasks: "
            f"{', '.join(task_evaluators) or 'none'})"
        )


def plan_merge(
    config: MergeConfig | Mapping[str, Any],
    registry: Mapping[str, Path] | None = None,
    *,
    adapter_cache: AdapterCache | None = None,
    task_evaluators: Mapping[str, str] | None = None,
) -> MergePlan:
    """Validate a merge request completely and resolve it into a `MergePlan`.

    `registry` maps task names to adapter directories (a workspace's `task_registry()`);
    `task_evaluators` (task -> evaluator kind) lets the plan check that an optimizer can run
    on the tasks it names; it also stands for the workspace a data-aware method (RegMean) needs,
    which is refused without it. Loads (and caches) the adapters' LoRA factors; computes nothing.
    """
    if isinstance(config, Mapping):
        config = parse_merge_config(dict(config))
    method = get_method(config.method)
    n_adapters = len(config.adapters)
    method.check_adapter_count(n_adapters)
    optimizer, optimizer_params = build_optimizer(config.optimizer.name, config.optimizer.params)
    initial = optimizer.initial_lambda(optimizer_params, n_adapters) if optimizer.initial_lambda else None
    params = _method_params(config, method, initial)
    policy = _build_policy(config.lambda_policy, method, params, n_adapters)
    transforms = tuple(
        PluginRef(built.spec.name, built.params)
        for built in (build_transform(t.name, t.params) for t in config.transforms)
    )
    resolved = resolve_adapter_specs(config.adapters, registry=registry)
    check_grams_available(method, [name for name, _ in resolved], task_evaluators)
    optimizer.check(method.name, [name for name, _ in resolved], task_evaluators)
    cache = adapter_cache if adapter_cache is not None else AdapterCache()
    adapters = [cache.load(name, path) for name, path in resolved]
    optimizer.check_adapters(adapters, task_evaluators)
    modules, left_out = check_compatible(adapters, config.merge_mode)
    if left_out:
        log.info("merge_mode=common leaves out modules: %s", left_out)
    check_layer_keys(policy.overrides, modules, "lambda_policy.overrides")
    _check_method_fits(method, transforms, adapters, modules)
    return MergePlan(
        config=config,
        method=method.name,
        params=params,
        policy=policy,
        transforms=transforms,
        optimizer=PluginRef(optimizer.name, optimizer_params),
        adapters=tuple(AdapterRef(name, Path(path).resolve()) for name, path in resolved),
        modules=tuple(modules),
        left_out=left_out,
    )


def plan_variant(
    plan: MergePlan, method_params: Mapping[str, Any], lambda_policy: Mapping[str, Any]
) -> MergePlan:
    """The same merge with other method params and lambda policy (a sweep's trial): validated
    like `plan_merge`, without resolving or loading the adapters again."""
    config = plan.config.model_copy(update={
        "method_params": dict(method_params),
        "lambda_policy": LambdaPolicyConfig.model_validate(dict(lambda_policy)),
    })
    method = get_method(plan.method)
    optimizer = get_optimizer(plan.optimizer.name)
    initial = (optimizer.initial_lambda(plan.optimizer.params, len(plan.adapters))
               if optimizer.initial_lambda else None)
    params = _method_params(config, method, initial)
    policy = _build_policy(config.lambda_policy, method, params, len(plan.adapters))
    check_layer_keys(policy.overrides, plan.modules, "lambda_policy.overrides")
    return replace(plan, config=config, params=params, policy=policy)
