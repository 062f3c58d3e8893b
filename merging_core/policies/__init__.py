"""Lambda policies: how a method's `lambda` is resolved for each module.

`scalar` uses one lambda everywhere. `per_layer` uses a default plus overrides keyed by the
layer index parsed from the LoRA key path (`...layers.3...` -> 3); modules outside any layer
(e.g. an `lm_head`) use the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

LambdaValue = float | list[float]


@dataclass(frozen=True)
class LambdaPolicy:
    kind: Literal["scalar", "per_layer"] = "scalar"
    overrides: Mapping[int, LambdaValue] = field(default_factory=dict)

    def resolve(self, layer: int | None, default: Any) -> Any:
        """The lambda for a module in `layer`, falling back to the method's `lambda`."""
        if self.kind == "per_layer" and layer is not None and layer in self.overrides:
            return self.overrides[layer]
        return default

    def describe(self, default: Any) -> dict[str, Any]:
        described: dict[str, Any] = {"type": self.kind, "default": default}
        if self.kind == "per_layer":
            described["overrides"] = {str(k): v for k, v in sorted(self.overrides.items())}
        return described
