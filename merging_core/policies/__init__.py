"""Lambda policies: how a method's `lambda` is resolved for each module.

`scalar` uses one lambda everywhere. `per_layer` uses a default plus overrides keyed by the
module's layer key (`merging_core.adapters.layer_keys`): the layer index parsed from the LoRA
key path (`...layers.3...` -> 3), or in an encoder-decoder model the stack and index
(`model.decoder.layers.3...` -> "decoder.3"); modules outside any layer (e.g. an `lm_head`)
use the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from merging_core.adapters import LayerKey, layer_sort_key

LambdaValue = float | list[float]


@dataclass(frozen=True)
class LambdaPolicy:
    kind: Literal["scalar", "per_layer"] = "scalar"
    overrides: Mapping[LayerKey, LambdaValue] = field(default_factory=dict)

    def resolve(self, layer: LayerKey | None, default: Any) -> Any:
        """The lambda for a module in `layer`, falling back to the method's `lambda`."""
        if self.kind == "per_layer" and layer is not None and layer in self.overrides:
            return self.overrides[layer]
        return default

    def describe(self, default: Any) -> dict[str, Any]:
        described: dict[str, Any] = {"type": self.kind, "default": default}
        if self.kind == "per_layer":
            ordered = sorted(self.overrides.items(), key=lambda item: layer_sort_key(item[0]))
            described["overrides"] = {str(k): v for k, v in ordered}
        return described
