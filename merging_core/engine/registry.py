"""The method registry: each merge method is registered once, with its parameter schema.

The schema (`ParamSpec`) is the single source for validation, defaults, the CLI, and the
HTTP API's `GET /methods`; nothing keeps a second copy of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from merging_core.errors import ParamError, UnknownMethodError
from merging_core.params import Params, ParamSpec, validate_params

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
SPACES = ("delta", "factors", "grams")


DeltaMergeFn = Callable[[Sequence[torch.Tensor], Params, torch.Generator | None], torch.Tensor]
FactorMergeFn = Callable[
    [Sequence[tuple[torch.Tensor, torch.Tensor, float]], Params], tuple[torch.Tensor, torch.Tensor]
]
# grams_fn(factors, grams, params) -> (B, A, notes): `grams` holds one raw Gram matrix (in x in,
# float64) per adapter, in adapter order; `notes` is what the run metadata shows for the module
# (e.g. a ridge the solve needed), empty when there is nothing to say.
GramMergeFn = Callable[
    [Sequence[tuple[torch.Tensor, torch.Tensor, float]], Sequence[torch.Tensor], Params],
    tuple[torch.Tensor, torch.Tensor, dict[str, Any]],
]
CoefficientsFn = Callable[[Params, int], list[float]]
# save_fn(module_merge, save_rank) -> (lora_B, lora_A, relative_error); see engine.saving.
SaveFn = Callable[[Any, int], tuple[torch.Tensor, torch.Tensor, float]]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method (the seed's registry fields plus a parameter schema).

    `space` says what `merge_in_memory` consumes: "delta" methods get the dense per-module
    deltas and return the merged delta; "factors" methods get (B, A, scaling) triples and
    return merged (B, A); "grams" methods (data-aware, e.g. RegMean) get the triples and each
    adapter's Gram matrix of that module's inputs and return (B, A, notes). A "grams" method
    needs the resident model and the task data: the runner asks the session for the Grams
    before merging (`needs_grams`). `linear_coefficients` is set for methods whose result is
    sum_i c_i * delta_i, which saves exactly as a concatenated LoRA.
    """

    name: str
    doc: str
    params: tuple[ParamSpec, ...]
    merge_in_memory: DeltaMergeFn | FactorMergeFn | GramMergeFn
    save_fn: SaveFn
    space: str = "delta"
    min_adapters: int = 2
    max_adapters: int | None = None
    saveable: bool = True
    linear_coefficients: CoefficientsFn | None = None
    params_validator: Callable[[Params, int], None] | None = None
    seeded: bool = False
    same_rank: bool = False  # every adapter must have the same rank in each module
    paper: str = ""
    param_index: dict[str, ParamSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"method name {self.name!r} must be lowercase snake_case")
        if self.space not in SPACES:
            raise ValueError(f"method {self.name}: space must be one of {', '.join(SPACES)}")
        object.__setattr__(self, "param_index", {p.name: p for p in self.params})

    @property
    def needs_grams(self) -> bool:
        """Whether merging needs each task's layer-input Grams (the resident model and data)."""
        return self.space == "grams"

    @property
    def required_params(self) -> list[str]:
        return [p.name for p in self.params if p.required]

    @property
    def params_defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params if not p.required}

    def check_adapter_count(self, n_adapters: int) -> None:
        low, high = self.min_adapters, self.max_adapters
        if n_adapters >= low and (high is None or n_adapters <= high):
            return
        if high is None:
            allowed = f"at least {low}"
        elif high == low:
            allowed = f"exactly {low}"
        else:
            allowed = f"{low} to {high}"
        raise ParamError(f"method {self.name!r} takes {allowed} adapters, got {n_adapters}")

    def normalize_params(self, params: Mapping[str, Any], n_adapters: int) -> Params:
        """Fill defaults and validate every parameter; unknown names are errors."""
        normalized = validate_params(f"method {self.name!r}", self.params, params, n_adapters)
        if self.params_validator is not None:
            try:
                self.params_validator(normalized, n_adapters)
            except ValueError as exc:
                raise ParamError(f"method {self.name!r}: {exc}") from exc
        return normalized

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc": self.doc,
            "paper": self.paper,
            "space": self.space,
            "linear": self.linear_coefficients is not None,
            "saveable": self.saveable,
            "min_adapters": self.min_adapters,
            "max_adapters": self.max_adapters,
            "required_params": self.required_params,
            "params_defaults": self.params_defaults,
            "params": [p.describe() for p in self.params],
        }


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method; names are checked at registration and duplicates fail fast."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown merge method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_methods() -> list[MergeMethod]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
