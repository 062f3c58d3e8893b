"""Resolve, load and validate PEFT LoRA adapters."""

from merging_core.adapters.loading import (
    AdapterCache,
    LoraAdapter,
    LoraModule,
    check_compatible,
    layer_index,
    load_adapter,
    load_task_registry,
    resolve_adapter_specs,
)

__all__ = [
    "AdapterCache",
    "LoraAdapter",
    "LoraModule",
    "check_compatible",
    "layer_index",
    "load_adapter",
    "load_task_registry",
    "resolve_adapter_specs",
]
