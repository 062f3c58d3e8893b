"""The search space of a sweep: grid points, or dimensions of a Bayesian search.

A point maps coordinate names to values: `lambda`, `lambda[1]` (one adapter's weight),
`lambda@layer3` (a per-layer override; `lambda@encoder.3` / `lambda@decoder.3` in an
encoder-decoder model, whose layers are keyed by stack), `lambda@group2` (one override for every
layer of layer group 2) or `lambda@group2[1]` (adapter 1's weight in group 2). Layer groups split
the L layers the merge's modules span (an encoder-decoder model's encoder layers, then its
decoder layers) into K contiguous blocks (`layer_groups`); they are resolved once the merge is
planned, and a group's value becomes the `per_layer` lambda override of each of its layers.
`point_to_merge` / `grid_point_to_merge` turn a point into the method params and lambda policy
of one merge.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from merging_core.adapters import STACKS, LayerKey, layer_keys, layer_sort_key
from merging_core.config.schema import MergeConfig, SearchConfig
from merging_core.errors import ConfigError

LayerGroups = tuple[tuple[LayerKey, ...], ...]
"""The layer keys of each layer group, group 0 first."""

_COORDINATE = re.compile(
    r"^(?P<param>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:@(?:(?P<where>layer|group)(?P<where_index>\d+)|(?P<stack>encoder|decoder)\.(?P<stack_index>\d+)))?"
    r"(?:\[(?P<adapter>\d+)\])?$"
)


@dataclass(frozen=True)
class Coordinate:
    """A coordinate name taken apart: `lambda@group2[1]` -> param lambda, group 2, adapter 1;
    `lambda@decoder.3` -> param lambda, layer "decoder.3"."""

    param: str
    layer: LayerKey | None = None
    group: int | None = None
    adapter: int | None = None


def parse_coordinate(name: str) -> Coordinate:
    """Read a coordinate name (`lambda`, `lambda[1]`, `lambda@layer3`, `lambda@decoder.3`,
    `lambda@group2[1]`)."""
    match = _COORDINATE.match(name)
    if match is None:
        raise ConfigError(
            f"search coordinate {name!r}: expected `param`, `param[i]`, `lambda@layerN`, "
            "`lambda@encoder.N` / `lambda@decoder.N` (encoder-decoder models) or `lambda@groupG` "
            "(optionally `[i]`)"
        )
    where, index, adapter = match["where"], match["where_index"], match["adapter"]
    layer: LayerKey | None = int(index) if where == "layer" else None
    if match["stack"] is not None:
        layer = f"{match['stack']}.{int(match['stack_index'])}"
    return Coordinate(
        param=match["param"],
        layer=layer,
        group=int(index) if where == "group" else None,
        adapter=int(adapter) if adapter is not None else None,
    )


def split_layers(layers: int | Sequence[LayerKey], n_groups: int) -> LayerGroups:
    """Layers (0..layers-1, or the given layer keys in order) in `n_groups` contiguous blocks;
    the first `n_layers mod n_groups` blocks take one layer more (30 layers, 4 groups -> 8, 8,
    7, 7 layers)."""
    keys: list[LayerKey] = list(range(layers)) if isinstance(layers, int) else list(layers)
    n_layers = len(keys)
    if n_groups < 1:
        raise ConfigError(f"per_layer_groups must be at least 1 (got {n_groups})")
    if n_groups > n_layers:
        raise ConfigError(
            f"per_layer_groups: {n_groups} groups but only {n_layers} "
            f"layer{'s' if n_layers != 1 else ''}; use at most {n_layers} groups"
        )
    size, longer = divmod(n_layers, n_groups)
    blocks = []
    start = 0
    for group in range(n_groups):
        stop = start + size + (1 if group < longer else 0)
        blocks.append(tuple(keys[start:stop]))
        start = stop
    return tuple(blocks)


def layer_order(modules: Iterable[str]) -> list[LayerKey]:
    """The layers the modules span, in order: 0..max index (so a layer no module targets still
    counts); in an encoder-decoder model encoder.0..encoder.max, then decoder.0..decoder.max."""
    keys = [key for key in layer_keys(modules).values() if key is not None]
    indices = [key for key in keys if isinstance(key, int)]
    order: list[LayerKey] = list(range(max(indices) + 1)) if indices else []
    for stack in STACKS:
        in_stack = [layer_sort_key(key)[1] for key in keys
                    if isinstance(key, str) and key.startswith(f"{stack}.")]
        order += [f"{stack}.{index}" for index in range(max(in_stack) + 1)] if in_stack else []
    return order


def layer_count(modules: Iterable[str]) -> int:
    """L: the number of layers the modules span (`layer_order`; 0 without any)."""
    return len(layer_order(modules))


def layer_group_count(search: SearchConfig) -> int | None:
    """K, the number of layer groups a search names (None: no layer groups). A Bayesian space
    declares it (`per_layer_groups`); a grid names every group, `lambda@group0`.. up to K-1."""
    if search.type == "bayes":
        counts = [space.per_layer_groups for space in search.space.values()
                  if space.per_layer_groups is not None]
        return counts[0] if counts else None
    coordinates = {key: parse_coordinate(key) for key in search.grid}
    for key, coordinate in coordinates.items():
        if coordinate.adapter is not None:
            raise ConfigError(
                f"search.grid.{key}: a grid gives per-adapter values as a list, e.g. "
                f"{coordinate.param}: [[0.5, 1.0]]"
            )
        if (coordinate.layer is not None or coordinate.group is not None) and coordinate.param != "lambda":
            raise ConfigError(
                f"search.grid.{key}: only lambda has per-layer overrides (lambda@layerN, "
                "lambda@encoder.N / lambda@decoder.N, lambda@groupG)"
            )
    groups = sorted(c.group for c in coordinates.values() if c.group is not None)
    if not groups:
        return None
    if any(c.layer is not None for c in coordinates.values()):
        raise ConfigError(
            "search.grid: lambda@layerN (or lambda@encoder.N / lambda@decoder.N) and "
            "lambda@groupG keys both set per-layer overrides; "
            "use one of them"
        )
    missing = sorted(set(range(max(groups) + 1)) - set(groups))
    if missing:
        raise ConfigError(
            f"search.grid: lambda@group keys name the groups 0..K-1 (K is their count), so every "
            f"one is needed; missing {', '.join(f'lambda@group{g}' for g in missing)}"
        )
    return len(groups)


def resolve_layer_groups(search: SearchConfig, modules: Iterable[str]) -> LayerGroups:
    """The layers of each of the search's layer groups over a planned merge's modules (empty
    without layer groups); more groups than layers is a ConfigError naming both numbers."""
    n_groups = layer_group_count(search)
    if n_groups is None:
        return ()
    order = layer_order(modules)
    n_layers = len(order)
    if n_groups > n_layers:
        where = ("search.space.lambda.per_layer_groups" if search.type == "bayes"
                 else f"search.grid (lambda@group0..lambda@group{n_groups - 1})")
        raise ConfigError(
            f"{where}: {n_groups} layer groups, but the merge's modules span only {n_layers} "
            f"layer{'s' if n_layers != 1 else ''}; use at most {n_layers} groups"
        )
    return split_layers(order, n_groups)


def _span(indices: Sequence[int]) -> str:
    return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])


def describe_layer_groups(groups: LayerGroups) -> list[str]:
    """Each group's layers, readable: `0-7`, `8`; by stack in an encoder-decoder model,
    `encoder 2-3, decoder 0-1`."""
    described = []
    for group in groups:
        if all(isinstance(key, int) for key in group):
            described.append(_span([int(key) for key in group]))
            continue
        by_stack: dict[str, list[int]] = {}
        for key in group:
            stack, index = str(key).split(".") if isinstance(key, str) else ("layer", str(key))
            by_stack.setdefault(stack, []).append(int(index))
        described.append(", ".join(f"{stack} {_span(indices)}" for stack, indices in by_stack.items()))
    return described


def coordinate_labels(names: Iterable[str], groups: LayerGroups,
                      adapters: Sequence[str] = ()) -> dict[str, str]:
    """Axis labels: a group coordinate shows its layers (and adapter), `lambda@group1[0]` ->
    `lambda@group1[0] (layers 8-15, topic)`, or its stacks' layers in an encoder-decoder model,
    `lambda@group1 (encoder 2-3, decoder 0-1)`; other names are their own label."""
    spans = describe_layer_groups(groups)
    labels = {}
    for name in names:
        try:
            coordinate = parse_coordinate(name)
        except ConfigError:
            labels[name] = name
            continue
        notes = []
        if coordinate.group is not None and coordinate.group < len(spans):
            span = spans[coordinate.group]
            if all(isinstance(key, int) for key in groups[coordinate.group]):
                span = f"layers {span}" if "-" in span else f"layer {span}"
            notes.append(span)
        if coordinate.adapter is not None and coordinate.adapter < len(adapters):
            notes.append(adapters[coordinate.adapter])
        labels[name] = f"{name} ({', '.join(notes)})" if notes else name
    return labels


@dataclass(frozen=True)
class Dimension:
    """One searched coordinate: a method param, optionally per adapter, per layer or per
    layer group (and per adapter within a group)."""

    param: str
    kind: str
    low: float
    high: float
    adapter: int | None = None
    layer: LayerKey | None = None
    group: int | None = None

    @property
    def name(self) -> str:
        if isinstance(self.layer, str):  # a stack layer, `lambda@decoder.3`
            return f"{self.param}@{self.layer}"
        if self.layer is not None:
            return f"{self.param}@layer{self.layer}"
        if self.group is not None:
            adapter = f"[{self.adapter}]" if self.adapter is not None else ""
            return f"{self.param}@group{self.group}{adapter}"
        if self.adapter is not None:
            return f"{self.param}[{self.adapter}]"
        return self.param

    def from_unit(self, unit: float) -> float | int:
        value = self.low + float(unit) * (self.high - self.low)
        return round(value) if self.kind == "int" else value

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
        if (space.per_layer or space.per_layer_groups) and param != "lambda":
            raise ConfigError(
                f"search.space.{param}: per_layer and per_layer_groups set lambda overrides; "
                "only lambda can have them"
            )
        if space.per_layer_groups:
            adapters: list[int | None] = list(range(n_adapters)) if space.per_adapter else [None]
            dimensions += [Dimension(param, space.type, low, space.max, adapter=adapter, group=group)
                           for group in range(space.per_layer_groups) for adapter in adapters]
        elif space.per_layer:
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


def _set_overrides(policy: dict[str, Any], overrides: Mapping[LayerKey, Any]) -> None:
    policy["type"] = "per_layer"
    policy["overrides"] = {**policy.get("overrides", {}), **overrides}


def _group_overrides(values: Mapping[int, Any], groups: LayerGroups | None) -> dict[LayerKey, Any]:
    """Each group's value as the override of every layer in it. `groups` None: not resolved
    yet (the merge is being planned to learn its layers), so no override."""
    if groups is None:
        return {}
    overrides: dict[LayerKey, Any] = {}
    for group, value in values.items():
        if group >= len(groups):
            raise ConfigError(f"lambda@group{group}: there are only {len(groups)} layer groups")
        overrides.update(dict.fromkeys(groups[group], value))
    return overrides


def point_to_merge(
    point: dict[str, Any], dimensions: Sequence[Dimension], config: MergeConfig,
    groups: LayerGroups | None = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method_params, lambda_policy) for a point of a Bayesian search space; `groups` are the
    resolved layer groups (`resolve_layer_groups`)."""
    params = dict(config.method_params)
    policy = config.lambda_policy.model_dump()
    per_adapter: dict[str, dict[int, Any]] = {}
    group_values: dict[int, Any] = {}
    group_adapter_values: dict[int, dict[int, Any]] = {}
    for dimension in dimensions:
        value = point[dimension.name]
        if dimension.layer is not None:
            _set_overrides(policy, {dimension.layer: value})
        elif dimension.group is not None and dimension.adapter is not None:
            group_adapter_values.setdefault(dimension.group, {})[dimension.adapter] = value
        elif dimension.group is not None:
            group_values[dimension.group] = value
        elif dimension.adapter is not None:
            per_adapter.setdefault(dimension.param, {})[dimension.adapter] = value
        else:
            params[dimension.param] = value
    for param, values in per_adapter.items():
        params[param] = [values[i] for i in sorted(values)]
    for group, by_adapter in group_adapter_values.items():
        group_values[group] = [by_adapter[i] for i in sorted(by_adapter)]
    overrides = _group_overrides(group_values, groups)
    if overrides:
        _set_overrides(policy, overrides)
    return params, policy


def grid_point_to_merge(
    point: dict[str, Any], config: MergeConfig, groups: LayerGroups | None = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method_params, lambda_policy) for a grid point (`lambda@layer3` and `lambda@decoder.3`
    keys set overrides, `lambda@group2` keys set the overrides of every layer in group 2)."""
    params = dict(config.method_params)
    policy = config.lambda_policy.model_dump()
    group_values: dict[int, Any] = {}
    for key, value in point.items():
        coordinate = parse_coordinate(key)
        if coordinate.layer is not None:
            _set_overrides(policy, {coordinate.layer: value})
        elif coordinate.group is not None:
            group_values[coordinate.group] = value
        else:
            params[key] = value
    overrides = _group_overrides(group_values, groups)
    if overrides:
        _set_overrides(policy, overrides)
    return params, policy
