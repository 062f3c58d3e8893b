"""Lambda optimizers: the hook where an optimizer sets the lambda policy before merging.

`none` keeps the configured policy. Active search over lambdas is a sweep
(`search.type: bayes`); learned per-layer lambdas (`adamerging`) plug in here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from merging_core.adapters import LoraAdapter
from merging_core.engine.registry import MergeMethod
from merging_core.params import ParamSpec, Params
from merging_core.errors import ParamError, UnknownMethodError
from merging_core.policies import LambdaPolicy


@dataclass(frozen=True)
class OptimizerContext:
    method: MergeMethod
    method_params: Params
    policy: LambdaPolicy
    adapters: Sequence[LoraAdapter]
    modules: Sequence[str]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    doc: str
    params: tuple[ParamSpec, ...]
    propose: Callable[[OptimizerContext, Params], LambdaPolicy]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "doc": self.doc, "params": [p.describe() for p in self.params]}


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "none": OptimizerSpec("none", "keep the configured lambda policy", (), lambda ctx, p: ctx.policy),
}


def build_optimizer(name: str, params: Mapping[str, Any]) -> tuple[OptimizerSpec, Params]:
    spec = OPTIMIZERS.get(name)
    if spec is None:
        hint = " (for Bayesian search over lambdas, use a sweep with search.type: bayes)"
        raise UnknownMethodError(
            f"unknown optimizer {name!r}; available: {', '.join(sorted(OPTIMIZERS))}"
            + (hint if name == "bayes" else "")
        )
    allowed = {p.name: p for p in spec.params}
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ParamError(f"optimizer {name!r} has no parameter {', '.join(map(repr, unknown))}")
    owner = f"optimizer {name!r}"
    validated = {
        p.name: p.validate(owner, params[p.name], 1) if p.name in params else p.default
        for p in spec.params
    }
    return spec, validated
