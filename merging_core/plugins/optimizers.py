"""The optimizer registry: the hook where an optimizer sets the lambda policy before merging.

`none` keeps the configured policy. `adamerging` learns per-layer, per-adapter lambdas by
entropy minimisation on the resident model (see `plugins/adamerging.py`). `bayes` runs a short
Bayesian search through the sweep machinery and merges with its best point; it lives with the
sweeps (`search/optimizer.py`) and registers itself here with `register_optimizer` when
`merging_core.search` is imported (the `merging_core` package imports it). What an optimizer
is, and the session it runs against, is in `plugins/optimizer_base.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merging_core.errors import ParamError, UnknownMethodError
from merging_core.params import Params, validate_params
from merging_core.plugins.adamerging import ADAMERGING
from merging_core.plugins.optimizer_base import OptimizerContext, OptimizerResult, OptimizerSpec


def _none(ctx: OptimizerContext, params: Params) -> OptimizerResult:
    return OptimizerResult(ctx.policy)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (OptimizerSpec("none", "keep the configured lambda policy", (), _none), ADAMERGING)
}


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Add an optimizer defined above this layer (`bayes`, in `search/`); names are unique."""
    if spec.name in OPTIMIZERS:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    OPTIMIZERS[spec.name] = spec
    return spec


def get_optimizer(name: str) -> OptimizerSpec:
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise UnknownMethodError(f"unknown optimizer {name!r}; available: {', '.join(sorted(OPTIMIZERS))}")
    return spec


def build_optimizer(name: str, params: Mapping[str, Any]) -> tuple[OptimizerSpec, Params]:
    """Look up an optimizer and validate its parameters."""
    spec = get_optimizer(name)
    owner = f"optimizer {name!r}"
    validated = validate_params(owner, spec.params, params)
    if spec.params_validator is not None:
        try:
            spec.params_validator(validated)
        except ValueError as exc:
            raise ParamError(f"{owner}: {exc}") from exc
    return spec, validated
