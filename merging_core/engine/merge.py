"""The in-memory merge result, computed module by module on demand.

`MergeOutput` holds the loaded adapters and the resolved parameters; it never keeps the dense
merged deltas of the whole model. Consumers (saving, the model holder, tests) pull one module
at a time, so peak memory stays at a few dense modules however large the model is.

A data-aware method (space "grams", e.g. RegMean) also gets a `GramSource`: each adapter's Gram
matrix of a module's inputs, read one module at a time. A source whose Grams depend on the merge
itself (RegMean++: inputs through the merged earlier layers) is `prepare`d with the merge's own
`delta` before any module is solved. Its results are LoRA factors (no dense
delta), kept once solved, so evaluating and saving the merge solve each module once.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from merging_core.adapters import LayerKey, LoraAdapter, LoraModule, layer_keys
from merging_core.engine.registry import MergeMethod, get_method
from merging_core.errors import ParamError
from merging_core.params import Params
from merging_core.plugins.transforms import Transform
from merging_core.policies import LambdaPolicy
from merging_core.runtime.paths import merge_tag


def module_generator(seed: int, module: str, salt: str = "") -> torch.Generator:
    """A generator seeded from (seed, module), so results do not depend on module order."""
    mixed = (int(seed) * 1_000_003 + zlib.crc32(f"{salt}/{module}".encode())) % (2**63)
    return torch.Generator().manual_seed(mixed)


class LazyDeltas(Sequence[torch.Tensor]):
    """The source deltas of one module, computed (and transformed) on each access.

    Nothing holds the dense source deltas between accesses, so a method that reads each once
    never keeps an untransformed copy alive; a delta costs one rank-r matmul to recompute.
    Transform randomness is seeded per (module, step, adapter), so access order is irrelevant.
    """

    def __init__(self, module: str, sources: list[LoraModule], transforms: Sequence[Transform]) -> None:
        self.module, self.sources, self.transforms = module, sources, transforms

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        delta = self.sources[index].delta()
        for step, transform in enumerate(self.transforms):
            generator = None
            if transform.spec.seeded:
                generator = module_generator(
                    transform.params["seed"], self.module, f"transform{step}/adapter{index}"
                )
            delta = transform.apply(delta, generator)
        return delta


class GramSource(Protocol):
    """Each adapter's Gram matrix G_i = X_i^T X_i of a module's inputs (collected on the resident
    model by the evaluation session; see `merging_core.evaluation.grams`)."""

    def grams(self, module: str) -> list[torch.Tensor]:
        """One raw Gram (in x in, float64) per adapter, in the merge's adapter order."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the run metadata shows about the Grams (settings, cache keys, token counts)."""
        ...

    def prepare(self, merged_delta: Callable[[str], torch.Tensor]) -> None:
        """Called once the merge exists, before any module is solved. A source whose Grams are
        taken through the merge's own earlier layers (RegMean++) collects them now, asking
        `merged_delta(module)` (which solves that module) for the layers before each one; a
        source of fixed Grams does nothing."""
        ...


@dataclass
class ModuleMerge:
    """The merge of one target module."""

    name: str
    sources: list[LoraModule]
    params: Params
    delta: torch.Tensor | None = None  # dense merged delta (delta-space methods)
    factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, A), scaling 1
    coefficients: list[float] | None = None  # set when delta == sum_i c_i * source_i
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. the ridge a solve needed

    def dense(self) -> torch.Tensor:
        if self.delta is not None:
            return self.delta
        assert self.factors is not None
        lora_B, lora_A = self.factors
        return lora_B @ lora_A


@dataclass
class MergeOutput:
    """A merge ready to be evaluated or saved: adapters, method, resolved params per module."""

    method: MergeMethod
    adapters: list[LoraAdapter]
    modules: list[str]
    left_out: dict[str, list[str]]
    params: Params
    policy: LambdaPolicy
    transforms: Sequence[Transform] = ()
    merge_mode: str = "common"
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "none", "params": {}})
    optimizer_artifacts: dict[str, Any] = field(default_factory=dict)
    optimizer_summary: dict[str, Any] = field(default_factory=dict)
    grams: GramSource | None = None  # for methods that need Grams (space "grams")
    _solved: dict[str, ModuleMerge] = field(default_factory=dict, init=False, repr=False)
    _layer_keys: dict[str, LayerKey | None] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def single(cls, adapter: LoraAdapter) -> MergeOutput:
        """One adapter as a merge of one: its delta exactly (task_vector, lambda 1)."""
        return cls(method=get_method("task_vector"), adapters=[adapter], modules=sorted(adapter.modules),
                   left_out={}, params={"lambda": 1.0}, policy=LambdaPolicy())

    @property
    def merge_tag(self) -> str:
        """Names this merge configuration (readable prefix + hash of everything that matters)."""
        return merge_tag(self.method.name, self.params, {
            "lambda_policy": self.policy.describe(self.params.get("lambda")),
            "transforms": [t.describe() for t in self.transforms],
            "optimizer": self.optimizer,
            "merge_mode": self.merge_mode,
        })

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def exact_linear(self) -> bool:
        """True when every module's result is exactly sum_i c_i * delta_i."""
        return self.method.linear_coefficients is not None and all(
            t.is_identity for t in self.transforms
        )

    def module_params(self, module: str) -> Params:
        params = dict(self.params)
        if "lambda" in params:
            if not self._layer_keys:  # keyed over all modules: a stack key needs both stacks
                self._layer_keys = layer_keys(self.modules)
            params["lambda"] = self.policy.resolve(self._layer_keys.get(module), params["lambda"])
        return params

    def plan_module(self, module: str) -> ModuleMerge:
        """Sources and resolved params of one module, nothing computed yet."""
        sources = [a.modules[module] for a in self.adapters]
        params = self.module_params(module)
        merged = ModuleMerge(name=module, sources=sources, params=params)
        if self.exact_linear:
            assert self.method.linear_coefficients is not None
            merged.coefficients = self.method.linear_coefficients(params, len(sources))
        return merged

    def merge_module(self, module: str) -> ModuleMerge:
        if module in self._solved:
            return self._solved[module]
        merged = self.plan_module(module)
        sources, params = merged.sources, merged.params
        if self.method.needs_grams:
            if self.grams is None:
                raise ParamError(f"method {self.method.name!r} needs Grams; this merge has none")
            triples = [(s.lora_B, s.lora_A, s.scaling) for s in sources]
            lora_B, lora_A, merged.notes = self.method.merge_in_memory(  # type: ignore[call-arg,misc]
                triples, self.grams.grams(module), params)
            merged.factors = (lora_B, lora_A)
            # The factors are LoRA-sized (rank sum r_i); keeping them spares a second solve.
            self._solved[module] = merged
            return merged
        if self.method.space == "factors":
            triples = [(s.lora_B, s.lora_A, s.scaling) for s in sources]
            merged.factors = self.method.merge_in_memory(triples, params)  # type: ignore[call-arg]
            return merged
        generator = module_generator(params["seed"], module) if self.method.seeded else None
        deltas = LazyDeltas(module, sources, self.transforms)
        merged.delta = self.method.merge_in_memory(deltas, params, generator)  # type: ignore[call-arg]
        return merged

    def delta(self, module: str) -> torch.Tensor:
        """The dense merged delta of one module (out x in, LoRA orientation)."""
        return self.merge_module(module).dense()

    def iter_deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        for module in self.modules:
            yield module, self.delta(module)

    def deltas(self) -> dict[str, torch.Tensor]:
        """Every merged delta at once; for small models and tests."""
        return dict(self.iter_deltas())

    def method_summary(self) -> dict[str, Any]:
        """What the run metadata shows about how the method ran: for a Grams method, the Grams
        and each module whose solve needed a note (e.g. a ridge), among the modules solved."""
        if self.grams is None:
            return {}
        notes = {m: merged.notes for m, merged in self._solved.items() if merged.notes}
        return {"grams": self.grams.describe(), "solved_modules": len(self._solved),
                "module_notes": notes}

    @property
    def heads(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each adapter's own heads (modules_to_save), never averaged."""
        return {a.name: a.heads for a in self.adapters if a.heads}

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method.name,
            "adapters": self.adapter_names,
            "num_modules": len(self.modules),
            "left_out": self.left_out,
        }
