"""Resolve, load and validate PEFT LoRA adapters."""

from merging_core.adapters.loading import (
    STACKS,
    AdapterCache,
    LayerKey,
    LoraAdapter,
    LoraModule,
    check_compatible,
    check_layer_keys,
    layer_index,
    layer_keys,
    layer_sort_key,
    load_adapter,
    load_task_registry,
    parse_layer_key,
    resolve_adapter_specs,
)

__all__ = [
    "STACKS",
    "AdapterCache",
    "LayerKey",
    "LoraAdapter",
    "LoraModule",
    "check_compatible",
    "check_layer_keys",
    "layer_index",
    "layer_keys",
    "layer_sort_key",
    "load_adapter",
    "load_task_registry",
    "parse_layer_key",
    "resolve_adapter_specs",
]
