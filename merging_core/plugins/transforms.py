"""Pre-merge transforms, run on each source adapter's dense delta before the method.

The sparsifiers of the generalized task-arithmetic family (`plugins.sparsifiers`) are usable
here on their own, e.g. `transforms: [{name: dare, params: {density: 0.3}}]` before
`task_vector`. The seed's `ties_scaffold` (once a no-op placeholder) is an alias of `magnitude`,
the TIES trim step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from merging_core.errors import ParamError, UnknownMethodError
from merging_core.params import ParamSpec, Params, validate_params
from merging_core.plugins.sparsifiers import SPARSIFIERS, ParamsCheck

TransformFn = Callable[[torch.Tensor, Params, torch.Generator | None], torch.Tensor]


@dataclass(frozen=True)
class TransformSpec:
    name: str
    doc: str
    params: tuple[ParamSpec, ...]
    fn: TransformFn
    seeded: bool = False
    check: ParamsCheck | None = None  # raises ValueError on a bad combination of parameters

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
        *(
            TransformSpec(s.name, s.doc, s.all_params, s.fn, seeded=s.seeded, check=s.check)
            for s in SPARSIFIERS.values()
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
    if spec.check is not None:
        try:
            spec.check(validated)
        except ValueError as exc:
            raise ParamError(f"{owner}: {exc}") from exc
    return Transform(spec, validated)
