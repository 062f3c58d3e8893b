"""Lambda optimizers: the hook where an optimizer sets the lambda policy before merging.

`none` keeps the configured policy. `adamerging` learns per-layer, per-adapter lambdas by
entropy minimisation on the resident model (see `plugins/adamerging.py`). Active search over
lambdas against labelled metrics is a sweep (`search.type: bayes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from merging_core.adapters import LoraAdapter
from merging_core.engine.registry import MergeMethod
from merging_core.errors import ParamError, UnknownMethodError
from merging_core.params import ParamSpec, Params, validate_params
from merging_core.policies import LambdaPolicy


@dataclass(frozen=True)
class OptimizerContext:
    """What an optimizer may look at. `session` is the evaluation session (resident model and
    workspace) when the merge runs where one exists (CLI with a workspace, the service)."""

    method: MergeMethod
    method_params: Params
    policy: LambdaPolicy
    adapters: Sequence[LoraAdapter]
    modules: Sequence[str]
    session: Any = None
    cancel: Any = None
    progress: Callable[[int, int, str, dict[str, Any]], None] | None = None


@dataclass
class OptimizerResult:
    """The policy to merge with, and files for the run bundle (name -> JSON-able or bytes)."""

    policy: LambdaPolicy
    artifacts: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    doc: str
    params: tuple[ParamSpec, ...]
    propose: Callable[[OptimizerContext, Params], OptimizerResult]
    params_validator: Callable[[Params], None] | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "doc": self.doc, "params": [p.describe() for p in self.params]}


def _none(ctx: OptimizerContext, params: Params) -> OptimizerResult:
    return OptimizerResult(ctx.policy)


def _registry() -> dict[str, OptimizerSpec]:
    from merging_core.plugins.adamerging import ADAMERGING

    return {
        "none": OptimizerSpec("none", "keep the configured lambda policy", (), _none),
        ADAMERGING.name: ADAMERGING,
    }


def build_optimizer(name: str, params: Mapping[str, Any]) -> tuple[OptimizerSpec, Params]:
    optimizers = _registry()
    spec = optimizers.get(name)
    if spec is None:
        hint = " (for Bayesian search over lambdas, use a sweep with search.type: bayes)"
        raise UnknownMethodError(
            f"unknown optimizer {name!r}; available: {', '.join(sorted(optimizers))}"
            + (hint if name == "bayes" else "")
        )
    owner = f"optimizer {name!r}"
    validated = validate_params(owner, spec.params, params)
    if spec.params_validator is not None:
        try:
            spec.params_validator(validated)
        except ValueError as exc:
            raise ParamError(f"{owner}: {exc}") from exc
    return spec, validated
