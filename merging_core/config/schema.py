"""The unified merge config: one schema for merges and sweeps, from YAML or JSON.

`MergeConfig` is what users write (YAML file, HTTP body); `MergeSpec` is the part a single
merge needs. Unknown keys are errors (`extra="forbid"`), so a typo never passes silently.
Legacy keys from the seed's migration table are rewritten with a `DeprecationWarning`.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    field_validator,
    model_validator,
)

from merging_core.adapters import LayerKey, parse_layer_key
from merging_core.adapters.loading import STACK_KEY_PATTERN

# strict: no silent coercion (`false` is no integer, "5" no number), so a config means what it
# says and the JSON schema is the whole truth about what is accepted.
_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)

LambdaValue = float | list[float]


class PluginConfig(BaseModel):
    """A named plugin (transform or optimizer) with its parameters."""

    model_config = _STRICT

    name: str = Field(description="registered name")
    params: dict[str, Any] = Field(default_factory=dict, description="plugin parameters")


def _plugin(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


# Rules between fields, written into the JSON schema (`if`/`then`, JSON Schema 2020-12, which
# OpenAPI 3.1 uses) so that the API's document states them as well as the validators do.
_OVERRIDES_NEED_PER_LAYER = {
    "if": {"properties": {"overrides": {"minProperties": 1}}, "required": ["overrides"]},
    "then": {"properties": {"type": {"const": "per_layer"}}, "required": ["type"]},
}


# A layer key is an index (3, or "3" as a JSON object key) or a stack layer of an
# encoder-decoder model ("encoder.3", "decoder.3"); see merging_core.adapters.layer_keys.
StackKeyField = Annotated[str, StringConstraints(pattern=STACK_KEY_PATTERN)]


def _layer_key(where: str, key: Any) -> LayerKey:
    try:
        return parse_layer_key(key)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


class LambdaPolicyConfig(BaseModel):
    """How `lambda` is resolved per module: `scalar` everywhere, or `per_layer` overrides."""

    model_config = ConfigDict(**_STRICT, json_schema_extra=_OVERRIDES_NEED_PER_LAYER)

    type: Literal["scalar", "per_layer"] = "scalar"
    default: LambdaValue | None = Field(
        default=None, description="lambda for modules without an override (else method_params.lambda)"
    )
    # JSON object keys are strings: a layer index may come as "3"
    overrides: dict[Annotated[int, Strict(False)] | StackKeyField, LambdaValue] = Field(
        default_factory=dict,
        description="layer key -> lambda (per_layer only): a layer index (3), or in an "
        "encoder-decoder model a stack layer (encoder.3, decoder.3)",
    )

    @field_validator("overrides", mode="before")
    @classmethod
    def _layer_keys(cls, overrides: Any) -> Any:
        if not isinstance(overrides, dict):
            return overrides
        return {_layer_key("lambda_policy.overrides", key): value for key, value in overrides.items()}

    @model_validator(mode="after")
    def _overrides_need_per_layer(self) -> LambdaPolicyConfig:
        if self.overrides and self.type != "per_layer":
            raise ValueError("lambda_policy.overrides needs type: per_layer")
        return self


class SearchParamSpace(BaseModel):
    """One searched dimension: a float or int range."""

    model_config = _STRICT

    type: Literal["float", "int"] = "float"
    min: float
    max: float
    per_adapter: bool = Field(default=False, description="one value per adapter")
    per_layer: list[int | StackKeyField] | None = Field(
        default=None, description="search a per-layer lambda override for these layers (indices, "
        "or encoder.N / decoder.N in an encoder-decoder model)"
    )
    per_layer_groups: int | None = Field(
        default=None,
        description="split the merge's L layers into this many contiguous blocks (the first "
        "L mod K one layer longer) and search one lambda override per block (per adapter with "
        "per_adapter: true)",
    )

    @field_validator("per_layer", mode="before")
    @classmethod
    def _layer_keys(cls, per_layer: Any) -> Any:
        if not isinstance(per_layer, list):
            return per_layer
        # a list holds layer indices as numbers (strict, as everywhere), so a string is a stack key
        for key in per_layer:
            if isinstance(key, str) and not isinstance(_layer_key("per_layer", key), str):
                raise ValueError(f"per_layer: layer key {key!r}: write a layer index as a number")
        return per_layer

    @model_validator(mode="after")
    def _ordered(self) -> SearchParamSpace:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self

    @model_validator(mode="after")
    def _one_layer_layout(self) -> SearchParamSpace:
        if self.per_layer_groups is None:
            return self
        if self.per_layer_groups < 1:
            raise ValueError(f"per_layer_groups must be at least 1 (got {self.per_layer_groups})")
        if self.per_layer is not None:
            raise ValueError(
                "per_layer and per_layer_groups both say which layers get an override; "
                "use one of them"
            )
        return self


class MultiFidelityConfig(BaseModel):
    """Successive halving over eval-subset sizes (a Bayesian sweep's `search.multi_fidelity`).

    Trials run in brackets: `eta ** (len(fidelities) - 1)` candidates (Sobol, then the GP's)
    are scored on the smallest subset, the best 1/eta of them on the next, and so on up to the
    last fidelity, the sweep's `eval_subset` itself, which alone ranks the sweep. Subsets are
    nested: each is a prefix of one fixed order of the largest."""

    model_config = _STRICT

    fidelities: list[int] = Field(
        min_length=2,
        description="eval subset sizes (examples per task), increasing; the last must equal "
        "eval_subset.max_samples (the fidelity the sweep is ranked at)",
    )
    eta: int = Field(default=3, ge=2, description="each rung promotes its best 1/eta to the next fidelity")

    @field_validator("fidelities")
    @classmethod
    def _increasing(cls, fidelities: list[int]) -> list[int]:
        if any(size < 1 for size in fidelities):
            raise ValueError(f"fidelities are subset sizes, each at least 1 (got {fidelities})")
        if any(later <= earlier for earlier, later in itertools.pairwise(fidelities)):
            raise ValueError(f"fidelities must increase strictly (got {fidelities})")
        return fidelities

    @property
    def rung_sizes(self) -> list[int]:
        """Trials per fidelity in one bracket: eta^(R-1), ..., eta, 1."""
        rungs = len(self.fidelities)
        return [self.eta ** (rungs - 1 - rung) for rung in range(rungs)]

    @property
    def bracket_size(self) -> int:
        return sum(self.rung_sizes)


_SEARCH_RULES = {"allOf": [
    # bayes searches `space`; grid (the default) searches `grid`
    {"if": {"properties": {"type": {"const": "bayes"}}, "required": ["type"]},
     "then": {"properties": {"space": {"minProperties": 1}}, "required": ["space"]},
     "else": {"properties": {"grid": {"minProperties": 1}}, "required": ["grid"]}},
    # successive halving is a Bayesian sweep's, proposing batches (qlognei, the default)
    {"if": {"properties": {"multi_fidelity": {"type": "object"}}, "required": ["multi_fidelity"]},
     "then": {"properties": {"type": {"const": "bayes"}, "acquisition": {"const": "qlognei"}},
              "required": ["type"]}},
]}


class SearchConfig(BaseModel):
    """Sweep search: a grid over `grid`, or Bayesian optimisation over `space` (optionally
    multi-fidelity: `multi_fidelity`)."""

    model_config = ConfigDict(**_STRICT, json_schema_extra=_SEARCH_RULES)

    type: Literal["grid", "bayes"] = "grid"
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="param -> values")
    space: dict[str, SearchParamSpace] = Field(default_factory=dict)
    budget: int = Field(default=20, ge=1, description="number of bayes trials")
    init_points: int = Field(default=6, ge=1, description="Sobol points before the GP")
    seed: int = 0
    acquisition: Literal["qlognei", "logei", "ei"] = "qlognei"
    warm_start_sweeps: list[str] = Field(default_factory=list)
    warm_start_max_points: int | None = Field(default=None, ge=0)
    multi_fidelity: MultiFidelityConfig | None = Field(
        default=None,
        description="successive halving over eval subset sizes (type bayes, acquisition "
        "qlognei, an eval_subset); budget counts trials at every fidelity",
    )

    @model_validator(mode="after")
    def _has_space(self) -> SearchConfig:
        if self.type == "grid" and not self.grid:
            raise ValueError("search.type grid needs search.grid")
        if self.type == "bayes" and not self.space:
            raise ValueError("search.type bayes needs search.space")
        return self

    @model_validator(mode="after")
    def _multi_fidelity_fits(self) -> SearchConfig:
        fidelity = self.multi_fidelity
        if fidelity is None:
            return self
        if self.type != "bayes":
            raise ValueError("search.multi_fidelity needs search.type bayes (a grid scores every point)")
        if self.acquisition != "qlognei":
            raise ValueError(
                f"search.multi_fidelity proposes each bracket's candidates as one batch, which "
                f"needs acquisition qlognei (it conditions on pending points); "
                f"{self.acquisition} proposes one point at a time"
            )
        if self.budget < fidelity.bracket_size:
            rungs = ", ".join(f"{n} at {size}" for n, size in zip(fidelity.rung_sizes, fidelity.fidelities))
            raise ValueError(
                f"search.budget ({self.budget}) is smaller than one successive-halving bracket "
                f"({fidelity.bracket_size} trials: {rungs}), so no trial would reach the top fidelity"
            )
        return self


class EvalSubsetOverride(BaseModel):
    model_config = _STRICT

    max_samples: int | None = Field(default=None, ge=1)
    seed: int | None = None
    shuffle: bool | None = None
    stratified: bool | None = None


class EvalSubsetConfig(BaseModel):
    """A deterministic evaluation subset; results are namespaced apart from full splits."""

    model_config = _STRICT

    enabled: bool = True
    seed: int = 0
    shuffle: bool = True
    stratified: bool = False
    max_samples: int | None = Field(default=None, ge=1)
    per_task: dict[str, EvalSubsetOverride] = Field(default_factory=dict)


class MergeSpec(BaseModel):
    """What one merge needs: adapters, method and its params, policy, plugins, saving."""

    model_config = _STRICT

    adapters: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    method: str
    merge_mode: Literal["common", "strict"] = "common"
    method_params: dict[str, Any] = Field(default_factory=dict)
    transforms: list[PluginConfig] = Field(default_factory=list)
    lambda_policy: LambdaPolicyConfig = Field(default_factory=LambdaPolicyConfig)
    optimizer: PluginConfig = Field(default_factory=lambda: PluginConfig(name="none"))
    save_merged: bool = False
    save_rank: int = Field(default=64, ge=1, description="rank of SVD-saved nonlinear merges")
    output_dir: str | None = Field(default=None, description="artifacts root (default ./artifacts)")

    @field_validator("adapters")
    @classmethod
    def _unique(cls, adapters: list[str]) -> list[str]:
        duplicates = sorted({a for a in adapters if adapters.count(a) > 1})
        if duplicates:
            raise ValueError(f"adapters are listed more than once: {', '.join(duplicates)}")
        return adapters

    # Shorthands, each declared as an input type so the JSON schema (and the API's OpenAPI
    # document) admits exactly what is accepted: plugin names as plain strings
    # (`transforms: [identity]`, `optimizer: none`, an empty `optimizer:`), `lambda_policy: per_layer`.
    @field_validator("transforms", mode="before", json_schema_input_type=list[PluginConfig | str])
    @classmethod
    def _transform_names(cls, transforms: Any) -> Any:
        return [_plugin(t) for t in transforms] if isinstance(transforms, list) else transforms

    @field_validator("optimizer", mode="before", json_schema_input_type=PluginConfig | str | None)
    @classmethod
    def _optimizer_name(cls, optimizer: Any) -> Any:
        return _plugin("none" if optimizer is None or optimizer == "" else optimizer)

    @field_validator("lambda_policy", mode="before",
                     json_schema_input_type=LambdaPolicyConfig | Literal["scalar", "per_layer"])
    @classmethod
    def _policy_type(cls, policy: Any) -> Any:
        return {"type": policy} if isinstance(policy, str) else policy


_LEGACY_KEYS = {
    "grid": "search.grid (with search.type: grid)",
    "lambda": "method_params.lambda",
    "params": "method_params",
}


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        # A ValueError inside a validator is a validation error (422), not a crash.
        raise ValueError(f"{key} must be a mapping (got {type(value).__name__})")
    return value


def migrate_legacy(raw: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the seed's legacy keys; each emits a DeprecationWarning naming the new key."""
    data = dict(raw)
    for old, new in _LEGACY_KEYS.items():
        if old in data:
            warnings.warn(
                f"config key {old!r} is deprecated; use {new}", DeprecationWarning, stacklevel=4
            )
    if "params" in data:
        legacy = _mapping(data, "params")
        data.pop("params")
        data["method_params"] = {**legacy, **_mapping(data, "method_params")}
    if "lambda" in data:
        value = data.pop("lambda")
        data["method_params"] = {"lambda": value, **_mapping(data, "method_params")}
    if "grid" in data:
        grid = _mapping(data, "grid")
        data.pop("grid")
        search = dict(_mapping(data, "search"))
        search.setdefault("type", "grid")
        search["grid"] = {**grid, **_mapping(search, "grid")}
        data["search"] = search
    return data


def _legacy_properties(schema: dict[str, Any]) -> None:
    """The legacy keys are accepted (and rewritten), so the schema lists them, deprecated."""
    numbers = {"anyOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}]}
    schema["properties"].update({
        "lambda": {**numbers, "deprecated": True, "description": "legacy: use method_params.lambda"},
        "params": {"type": "object", "deprecated": True, "description": "legacy: use method_params"},
        "grid": {"type": "object", "additionalProperties": {"type": "array", "items": {}}, "deprecated": True,
                 "description": "legacy: use search.grid (with search.type: grid)"},
    })


class MergeConfig(MergeSpec):
    """The unified merge + sweep config (the seed's schema)."""

    model_config = ConfigDict(**_STRICT, json_schema_extra=_legacy_properties)

    search: SearchConfig | None = None
    constraint_nonnegative: bool = Field(
        default=True, description="keep searched lambdas >= 0"
    )
    eval_tasks: list[str] | None = Field(default=None, description="tasks to evaluate on")
    split: str = "test"
    eval_subset: EvalSubsetConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return migrate_legacy(data)

    def to_spec(self) -> MergeSpec:
        return MergeSpec(**{name: getattr(self, name) for name in MergeSpec.model_fields})
