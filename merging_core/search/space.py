"""The search space of a sweep: grid points, or dimensions of a Bayesian search.

A point maps coordinate names to values: `lambda`, `lambda[1]` (one adapter's weight) or
`lambda@layer3` (a per-layer override). `point_to_merge` turns a point into the method params
and lambda policy of one merge.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from merging_core.config.schema import MergeConfig, SearchConfig
from merging_core.errors import ConfigError


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


def grid_points(search: SearchConfig) -> list[dict[str, Any]]:
    """Every combination of `search.grid`, in order (the last key varies fastest)."""
    keys = list(search.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(search.grid[k] for k in keys))]


def point_to_merge(
    point: dict[str, Any], dimensions: Sequence[Dimension], config: MergeConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method_params, lambda_policy) for a point of a Bayesian search space."""
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


def grid_point_to_merge(point: dict[str, Any], config: MergeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method_params, lambda_policy) for a grid point (`lambda@layer3` keys set overrides)."""
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
