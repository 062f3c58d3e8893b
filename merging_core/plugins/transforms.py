"""Pre-merge transforms, run on each source adapter's dense delta before the method.

The sparsifiers of the generalized task-arithmetic family are usable here on their own, e.g.
`transforms: [{name: dare, params: {density: 0.3}}]` before `task_vector`. The seed's
`ties_scaffold` (once a no-op placeholder) is an alias of `magnitude`, the TIES trim step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from merging_core.params import ParamKind, ParamSpec, Params, validate_params
from merging_core.errors import ParamError, UnknownMethodError
from merging_core.methods import sparsify

TransformFn = Callable[[torch.Tensor, Params, torch.Generator | None], torch.Tensor]

_DENSITY = ParamSpec("density", ParamKind.FLOAT, "fraction of entries kept", 0.2, 0.0, 1.0)
_SEED = ParamSpec("seed", ParamKind.INT, "random seed (per module and adapter)", 0, 0)
_RESCALE = ParamSpec("rescale", ParamKind.BOOL, "rescale survivors by 1/keep-probability", True)


@dataclass(frozen=True)
class TransformSpec:
    name: str
    doc: str
    params: tuple[ParamSpec, ...]
    fn: TransformFn
    seeded: bool = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "doc": self.doc, "params": [p.describe() for p in self.params]}


@dataclass(frozen=True)
class Transform:
    """A transform with validated parameters."""

    spec: TransformSpec
    params: Params

    @property
    def is_identity(self) -> bool:
        return self.spec.name == "identity"

    def apply(self, delta: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.spec.fn(delta, self.params, generator)

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec.name, "params": self.params}


TRANSFORMS: dict[str, TransformSpec] = {
    spec.name: spec
    for spec in (
        TransformSpec("identity", "leave the delta unchanged", (), lambda d, p, g: d),
        TransformSpec(
            "magnitude",
            "keep the top `density` fraction by magnitude (TIES trim)",
            (_DENSITY,),
            lambda d, p, g: sparsify.magnitude(d, p["density"]),
        ),
        TransformSpec(
            "dare",
            "drop entries at random, keep `density`, rescale (DARE)",
            (ParamSpec("density", ParamKind.FLOAT, "keep probability", 0.5, 0.0, 1.0),
             _RESCALE, _SEED),
            lambda d, p, g: sparsify.random_drop(d, p["density"], rescale=p["rescale"], generator=g),
            seeded=True,
        ),
        TransformSpec(
            "breadcrumbs",
            "drop the top `gamma` outliers and keep the next `density` (Model Breadcrumbs)",
            (
                ParamSpec("density", ParamKind.FLOAT, "fraction kept after the outliers", 0.9, 0.0, 1.0),
                ParamSpec("gamma", ParamKind.FLOAT, "fraction of largest entries dropped", 0.01, 0.0, 1.0),
            ),
            lambda d, p, g: sparsify.breadcrumbs(d, p["density"], p["gamma"]),
        ),
        TransformSpec(
            "della",
            "magnitude-ranked random drop (DELLA MagPrune)",
            (
                ParamSpec("density", ParamKind.FLOAT, "mean keep probability", 0.5, 0.0, 1.0),
                ParamSpec("epsilon", ParamKind.FLOAT, "spread of keep probabilities", 0.1, 0.0, 1.0),
                _RESCALE,
                _SEED,
            ),
            lambda d, p, g: sparsify.della_magprune(
                d, p["density"], p["epsilon"], rescale=p["rescale"], generator=g
            ),
            seeded=True,
        ),
    )
}
ALIASES = {"ties_scaffold": "magnitude"}


def build_transform(name: str, params: Mapping[str, Any]) -> Transform:
    """Look up a transform by name (or alias) and validate its parameters."""
    if name in ALIASES:
        warnings.warn(
            f"transform {name!r} is deprecated; use {ALIASES[name]!r}", DeprecationWarning, stacklevel=2
        )
        name = ALIASES[name]
    spec = TRANSFORMS.get(name)
    if spec is None:
        raise UnknownMethodError(
            f"unknown transform {name!r}; available: {', '.join(sorted(TRANSFORMS))}"
        )
    owner = f"transform {name!r}"
    validated = validate_params(owner, spec.params, params)
    if name == "della":
        density, epsilon = validated["density"], validated["epsilon"]
        if density - epsilon / 2 <= 0 or density + epsilon / 2 > 1:
            raise ParamError(f"{owner}: density ± epsilon/2 must stay within (0, 1]")
    return Transform(spec, validated)
