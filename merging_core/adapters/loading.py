"""Adapter resolution and loading.

An adapter is named either by a task (looked up in a task registry, i.e. a workspace file's
`tasks` section) or by an explicit directory holding a PEFT LoRA adapter
(`adapter_config.json` + `adapter_model.safetensors`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file

from merging_core.errors import (
    AdapterNotFoundError,
    ConfigError,
    IncompatibleAdaptersError,
    NonFiniteWeightsError,
    UnsupportedAdapterError,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
_UNSUPPORTED_KEY_PARTS = {
    "lora_magnitude_vector": "DoRA magnitude vectors",
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
}
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")

LayerKey = int | str
"""A layer's key: its index (`3`) in a single-stack model, `"encoder.3"` / `"decoder.3"` in
an encoder-decoder one."""

STACKS = ("encoder", "decoder")  # in layer order: every encoder layer comes before the decoder
STACK_KEY_PATTERN = r"^(encoder|decoder)\.(0|[1-9][0-9]*)$"
_STACK_KEY = re.compile(STACK_KEY_PATTERN)
_INDEX_KEY = re.compile(r"^-?[0-9]+$")  # as a JSON object key; a negative one overrides nothing


def layer_index(module: str) -> int | None:
    """The transformer layer index in a module path (`model.layers.3.self_attn.q_proj` -> 3)."""
    match = _LAYER_INDEX.search(module)
    return int(match.group(1)) if match else None


def _stack_and_index(module: str) -> tuple[str | None, int] | None:
    """(stack, index) of a module path: the first numeric path component is the layer index,
    the last `encoder`/`decoder` component before it the stack (`model.decoder.layers.3.
    encoder_attn.v_proj` -> ("decoder", 3), `encoder.block.3.layer.0.SelfAttention.q` ->
    ("encoder", 3), `model.layers.3.mlp` -> (None, 3)); None outside any numbered layer."""
    parts = module.split(".")
    for position, part in enumerate(parts):
        if position and part.isascii() and part.isdigit():
            stacks = [p for p in parts[:position] if p in STACKS]
            return (stacks[-1] if stacks else None), int(part)
    return None


def layer_keys(modules: Iterable[str]) -> dict[str, LayerKey | None]:
    """Each module's layer key (None outside any numbered layer).

    A merge's modules are keyed by stack (`"encoder.3"`, `"decoder.3"`) only when they lie in
    both an encoder and a decoder stack (Whisper, T5, BART); otherwise by plain index, so a
    single-stack model keeps int keys even when its path names a stack (BERT's
    `bert.encoder.layer.3`, OPT's `model.decoder.layers.3`).
    """
    parsed = {module: _stack_and_index(module) for module in modules}
    stacked = {found[0] for found in parsed.values() if found is not None} >= set(STACKS)
    keys: dict[str, LayerKey | None] = {}
    for module, found in parsed.items():
        if found is None:
            keys[module] = None
        elif stacked and found[0] is not None:
            keys[module] = f"{found[0]}.{found[1]}"
        else:
            # a numbered module outside both stacks of an encoder-decoder model keeps its index
            keys[module] = found[1]
    return keys


def parse_layer_key(key: object) -> LayerKey:
    """A layer key as written in a config: an index (`3`, `"3"`) or a stack layer
    (`"encoder.3"`, `"decoder.3"`); anything else is a ValueError naming it."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str):
        if _INDEX_KEY.match(key):
            return int(key)
        if _STACK_KEY.match(key):
            return key
    raise ValueError(
        f"layer key {key!r}: expected a layer index (3) or a stack layer (encoder.3, decoder.3)"
    )


def layer_sort_key(key: LayerKey) -> tuple[int, int]:
    """Layer order: by index; in an encoder-decoder model every encoder layer first."""
    if isinstance(key, int):
        return 0, key
    stack, index = key.split(".")
    return STACKS.index(stack), int(index)


def check_layer_keys(keys: Iterable[LayerKey], modules: Iterable[str], where: str) -> None:
    """Refuse layer keys of the wrong kind for the merge's modules: a stack key (`decoder.1`)
    when they are not in both an encoder and a decoder stack, a plain index when they are (it
    would override nothing). A layer past the last one is left alone for both kinds, as a plain
    index always was."""
    known = set(layer_keys(modules).values())
    stacked = any(isinstance(key, str) for key in known)
    indexed = any(isinstance(key, int) for key in known)
    for key in keys:
        if isinstance(key, str) and not stacked:
            raise ConfigError(
                f"{where}: layer key {key!r} names a stack, but the merge's modules are not in "
                "both an encoder and a decoder stack; name their layers by index (e.g. 3)"
            )
        if isinstance(key, int) and stacked and not indexed:
            raise ConfigError(
                f"{where}: layer key {key!r} is a plain index, but the merge's modules are in an "
                f"encoder and a decoder stack; name the stack (encoder.{key} or decoder.{key})"
            )


@dataclass(frozen=True)
class LoraModule:
    """One target module of a LoRA adapter: delta = scaling * B @ A (shape out x in)."""

    name: str
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.lora_B.shape[0]), int(self.lora_A.shape[1])

    @property
    def layer(self) -> int | None:
        return layer_index(self.name)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight delta, in the LoRA orientation (out x in)."""
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)).mul_(self.scaling)


@dataclass
class LoraAdapter:
    """A loaded PEFT LoRA adapter: its factors per module, its heads, and where it came from."""

    name: str
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for run metadata."""
        ranks = sorted({m.rank for m in self.modules.values()})
        return {
            "name": self.name,
            "path": str(self.path),
            "base_model_name_or_path": self.base_model,
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora", False)),
            "ranks": ranks,
            "num_modules": len(self.modules),
            "heads": sorted(self.heads),
            "checksums": self.checksums,
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_task_registry(path: str | Path) -> dict[str, Path]:
    """Read a task registry: a YAML file whose `tasks` maps names to `{adapter: dir}` or a dir.

    The workspace file is such a registry. Relative adapter paths are relative to the file.
    """
    registry_path = Path(path)
    if not registry_path.is_file():
        raise ConfigError(f"task registry file not found: {registry_path}")
    try:
        raw = yaml.safe_load(registry_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"task registry {registry_path} is not valid YAML: {exc}") from exc
    tasks = raw.get("tasks") if isinstance(raw, dict) else None
    if not isinstance(tasks, dict):
        raise ConfigError(f"task registry {registry_path} has no `tasks` mapping")
    registry: dict[str, Path] = {}
    for name, entry in tasks.items():
        adapter = entry.get("adapter") if isinstance(entry, dict) else entry
        if not isinstance(adapter, str):
            raise ConfigError(f"task {name!r} in {registry_path} has no `adapter` path")
        adapter_path = Path(adapter)
        registry[str(name)] = (
            adapter_path if adapter_path.is_absolute() else registry_path.parent / adapter_path
        )
    return registry


def resolve_adapter_specs(
    specs: Sequence[str | Path],
    *,
    registry: Mapping[str, Path] | None = None,
) -> list[tuple[str, Path]]:
    """Turn task names or directories into `(name, directory)` pairs, in the given order."""
    registry = registry or {}
    resolved: list[tuple[str, Path]] = []
    for spec in specs:
        text = str(spec)
        if text in registry:
            name, path = text, Path(registry[text])
        else:
            path = Path(text).expanduser()
            name = path.name
            if not path.is_dir():
                known = ", ".join(sorted(registry)) or "none"
                raise AdapterNotFoundError(
                    f"adapter {text!r} is neither a known task (known tasks: {known}) "
                    "nor an existing adapter directory"
                )
        if not path.is_dir():
            raise AdapterNotFoundError(f"adapter directory for task {name!r} not found: {path}")
        resolved.append((name, path))
    names = [name for name, _ in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"adapters are listed more than once: {', '.join(duplicates)}")
    return resolved


def _check_config(name: str, config: dict[str, Any]) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"adapter {name!r} is a {peft_type or 'unknown'} adapter; only PEFT LORA adapters "
            "are supported"
        )
    if config.get("use_dora"):
        raise UnsupportedAdapterError(
            f"adapter {name!r} uses DoRA (use_dora=true); DoRA adapters cannot be merged as "
            "LoRA deltas"
        )
    if config.get("lora_bias"):
        raise UnsupportedAdapterError(f"adapter {name!r} trains LoRA biases (lora_bias=true)")
    for key in ("use_qalora", "use_bdlora"):
        if config.get(key):
            raise UnsupportedAdapterError(f"adapter {name!r} sets {key}=true, which is unsupported")
    if config.get("layer_replication"):
        raise UnsupportedAdapterError(f"adapter {name!r} uses layer_replication")


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    alpha_key = get_pattern_key(list(alpha_pattern), module)
    alpha = float(alpha_pattern.get(alpha_key, config.get("lora_alpha", rank)))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def _expected_rank(config: dict[str, Any], module: str) -> int:
    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    rank_key = get_pattern_key(list(rank_pattern), module)
    return int(rank_pattern.get(rank_key, config.get("r", 8)))


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Load a PEFT LoRA adapter directory, refusing formats and features we cannot merge."""
    adapter_dir = Path(path)
    name = name or adapter_dir.name
    if not adapter_dir.is_dir():
        raise AdapterNotFoundError(f"adapter {name!r}: directory not found: {adapter_dir}")
    config_path = adapter_dir / CONFIG_FILE
    weights_path = adapter_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        if (adapter_dir / PICKLE_WEIGHTS_FILE).is_file():
            raise UnsupportedAdapterError(
                f"adapter {name!r} at {adapter_dir} only has {PICKLE_WEIGHTS_FILE} (a pickle); "
                f"pickles can run code when loaded, so we refuse them. Convert it to "
                f"{WEIGHTS_FILE} (e.g. save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterNotFoundError(f"adapter {name!r}: {weights_path} does not exist")
    if not config_path.is_file():
        raise AdapterNotFoundError(f"adapter {name!r}: {config_path} does not exist")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedAdapterError(f"adapter {name!r}: {config_path} is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise UnsupportedAdapterError(f"adapter {name!r}: {config_path} is not a JSON object")
    _check_config(name, config)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise UnsupportedAdapterError(f"adapter {name!r}: cannot read {weights_path}: {exc}") from exc

    factors: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise NonFiniteWeightsError(f"adapter {name!r}: tensor {key!r} contains NaN or Inf")
        for part, what in _UNSUPPORTED_KEY_PARTS.items():
            if f".{part}" in key:
                raise UnsupportedAdapterError(f"adapter {name!r} contains {what} ({key}); unsupported")
        short = key.removeprefix(PEFT_PREFIX)
        match = _LORA_KEY.match(short)
        if match:
            factors.setdefault(match.group("module"), {})[match.group("part")] = tensor
        else:
            heads[short] = tensor

    modules: dict[str, LoraModule] = {}
    for module, parts in sorted(factors.items()):
        if set(parts) != {"A", "B"}:
            raise UnsupportedAdapterError(f"adapter {name!r}: module {module} lacks lora_A or lora_B")
        lora_A, lora_B = parts["A"], parts["B"]
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
            raise UnsupportedAdapterError(
                f"adapter {name!r}: module {module} has lora_A {tuple(lora_A.shape)} and lora_B "
                f"{tuple(lora_B.shape)}, which are not a rank-r pair"
            )
        rank = int(lora_A.shape[0])
        expected = _expected_rank(config, module)
        if expected != rank:
            log.warning("adapter %s: %s has rank %d, config says %d", name, module, rank, expected)
        modules[module] = LoraModule(
            name=module,
            lora_A=lora_A.float(),
            lora_B=lora_B.float(),
            scaling=_scaling(config, module, rank),
        )
    if not modules:
        raise UnsupportedAdapterError(f"adapter {name!r} at {adapter_dir} has no LoRA weights")
    checksums = {CONFIG_FILE: _sha256(config_path), WEIGHTS_FILE: _sha256(weights_path)}
    return LoraAdapter(
        name=name, path=adapter_dir, config=config, modules=modules, heads=heads, checksums=checksums
    )


class AdapterCache:
    """Loaded adapters by (name, resolved directory), so sweeps, plans and sessions load each
    adapter once. Adapters are small next to a base model (LoRA factors and heads)."""

    def __init__(self) -> None:
        self._adapters: dict[tuple[str, Path], LoraAdapter] = {}

    def load(self, name: str, path: str | Path) -> LoraAdapter:
        key = (name, Path(path).resolve())
        adapter = self._adapters.get(key)
        if adapter is None:
            adapter = self._adapters[key] = load_adapter(path, name)
        return adapter

    def __len__(self) -> int:
        return len(self._adapters)


def _model_id(name: str | None) -> str | None:
    # A local path and a hub id of the same model share the last component.
    return Path(name.rstrip("/")).name if name else None


def check_compatible(
    adapters: Sequence[LoraAdapter], merge_mode: str
) -> tuple[list[str], dict[str, list[str]]]:
    """Check that the adapters can be merged; return the modules to merge and those left out.

    `common` merges the modules every adapter has and reports the others per adapter; `strict`
    refuses differing module sets. Shapes must agree in both modes.
    """
    bases = {a.name: _model_id(a.base_model) for a in adapters if a.base_model}
    if len(set(bases.values())) > 1:
        listed = ", ".join(f"{n}: {adapters_base}" for n, adapters_base in bases.items())
        raise IncompatibleAdaptersError(f"adapters belong to different base models ({listed})")
    if len({a.fan_in_fan_out for a in adapters}) > 1:
        raise IncompatibleAdaptersError("adapters disagree on fan_in_fan_out")

    module_sets = [set(a.modules) for a in adapters]
    common = set.intersection(*module_sets)
    left_out = {
        a.name: sorted(set(a.modules) - common) for a in adapters if set(a.modules) - common
    }
    if merge_mode == "strict" and left_out:
        detail = "; ".join(f"{n} only: {', '.join(mods)}" for n, mods in left_out.items())
        raise IncompatibleAdaptersError(
            f"merge_mode=strict but the adapters target different modules ({detail})"
        )
    if not common:
        raise IncompatibleAdaptersError("the adapters share no target module")

    mismatched = []
    for module in sorted(common):
        shapes = {a.name: a.modules[module].shape for a in adapters}
        if len(set(shapes.values())) > 1:
            mismatched.append(
                f"{module} (" + ", ".join(f"{n}: {s[0]}x{s[1]}" for n, s in shapes.items()) + ")"
            )
    if mismatched:
        raise IncompatibleAdaptersError(
            "adapters have different weight shapes, so they were trained on different base "
            f"models: {'; '.join(mismatched[:5])}" + (" ..." if len(mismatched) > 5 else "")
        )
    return sorted(common), left_out
