"""Gram matrices of each task's layer inputs, for data-aware merging (RegMean).

For task t, with t's own adapter applied and t's head on, `samples_per_task` rows of its split
(chosen with `seed`) run through the resident model once; a forward pre-hook on every adapter
module adds X^T X of that module's input to a running float64 Gram (all modules at once, one
pass per task). Only real tokens count: padding positions are dropped by the attention mask,
and the model sees exactly the prompt the task's evaluator sees (rendered, chat template and
truncation included; no label or reference tokens), so for causal-LM tasks only prompt
positions count. Batches are right-padded, so every real token sits at the position it has in
the unpadded prompt.

The raw Grams (before RegMean's off-diagonal scaling) are cached on disk
(`runtime.paths.gram_file`), one file per module, under a key of everything they depend on:
base model and dtype, the adapter's weights, the split's data, the task's settings,
`samples_per_task`, `seed` and `split`. A manifest written last marks a key complete, so a
second run reads the files instead of collecting again. Merging reads one module's Grams at a
time (`CachedGrams.grams`).

RegMean++ (`plus`; Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and Generalization
of Regression Mean for Model Merging") takes each layer's Grams through the merge's own earlier
layers: layer by layer, in forward order, each task's inputs run through the model with every
earlier layer merged (solved already) and the task's own adapter on the layer being collected,
and the forward pass stops once that layer's modules have seen their inputs. Those Grams depend
on every adapter and on the merge's parameters, so they are not cached (`SequentialGrams`); a
merge costs one partial forward pass per layer and task.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from merging_core.adapters import LayerKey, LoraAdapter, layer_keys
from merging_core.adapters.loading import WEIGHTS_FILE
from merging_core.engine.merge import MergeOutput
from merging_core.errors import EvaluationError
from merging_core.evaluation.evaluators import length_sorted_batches, prompt_ids
from merging_core.evaluation.holder import ModelHolder
from merging_core.evaluation.workspace import TaskConfig
from merging_core.runtime.cancel import CancelToken, Progress, check, report
from merging_core.runtime.io import atomic_save_safetensors, atomic_write_json
from merging_core.runtime.paths import gram_file, grams_manifest_file

log = logging.getLogger(__name__)

GRAMS_FORMAT = 2  # part of every cache key: bump when what a cached Gram means changes
# Evaluators whose model input is the task's text (as a prompt for the causal-LM ones).
PROMPT_EVALUATORS = ("causal_lm_label_scoring", "generation")
GRAM_EVALUATORS = ("sequence_classification", *PROMPT_EVALUATORS)


@dataclass(frozen=True)
class GramSettings:
    """Which inputs a task's Grams are collected on."""

    samples_per_task: int
    split: str
    seed: int


@dataclass(frozen=True)
class TaskGrams:
    """One task's Grams on disk: its cache key and what the collection saw."""

    task: str
    key: str
    rows: int
    tokens: int
    cached: bool  # read from the cache (no forward pass) rather than collected now
    seconds: float  # collection time (of the run that collected them)


class CachedGrams:
    """The Grams of a merge's adapters, read from the cache one module at a time, onto `device`
    (a `merging_core.engine.merge.GramSource`)."""

    def __init__(self, root: Path, tasks: Sequence[TaskGrams], settings: GramSettings,
                 device: torch.device) -> None:
        self.root, self.tasks, self.settings, self.device = Path(root), list(tasks), settings, device

    def grams(self, module: str) -> list[torch.Tensor]:
        return [load_file(gram_file(self.root, entry.task, entry.key, module), device=str(self.device))["gram"]
                for entry in self.tasks]

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.settings), "tasks": {entry.task: asdict(entry) for entry in self.tasks}}

    def prepare(self, merged_delta: Callable[[str], torch.Tensor]) -> None:
        """Fixed Grams: nothing to do before solving."""


def select_rows(n_rows: int, samples: int, seed: int) -> list[int]:
    """`samples` row indices of `n_rows` (all of them when there are no more), chosen with `seed`,
    in increasing order."""
    if samples >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), samples))


def gram_key(*, model_path: Path, dtype: torch.dtype, model_class: str, adapter: LoraAdapter,
             data_checksum: str, task: TaskConfig, settings: GramSettings) -> str:
    """The cache key of one task's Grams: everything they depend on."""
    return hashlib.sha256(json.dumps({
        "format": GRAMS_FORMAT, "model_path": str(model_path), "dtype": str(dtype),
        "model_class": model_class, "adapter": adapter.checksums.get(WEIGHTS_FILE, ""),
        "data": data_checksum, "task": task.model_dump(mode="json"), **asdict(settings),
    }, sort_keys=True).encode()).hexdigest()[:32]


def prompt_token_ids(tokenizer: Any, task: TaskConfig, text: str) -> list[int]:
    """The token ids the task's evaluator feeds the model for `text`: for causal-LM evaluators
    the prompt exactly as label scoring sees it (`evaluators.prompt_ids`); the text itself,
    truncated to `max_length`, for classification."""
    if task.evaluator in PROMPT_EVALUATORS:
        return prompt_ids(tokenizer, task, text)
    return list(tokenizer(text, truncation=True, max_length=task.max_length)["input_ids"])


def right_padded(tokenizer: Any, task: TaskConfig, texts: Sequence[str],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """One batch, right-padded (real tokens at their unpadded positions, for causal and
    bidirectional models alike), with its attention mask."""
    rows = [prompt_token_ids(tokenizer, task, text) for text in texts]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    return {"input_ids": input_ids, "attention_mask": mask}


class GramAccumulator:
    """Running float64 Grams X^T X of each observed module's inputs, over counted positions.

    Modules fed the very same tensor in a batch (q/k/v projections, gate/up) share one product.
    """

    def __init__(self) -> None:
        self.grams: dict[str, torch.Tensor] = {}
        self.keep: torch.Tensor | None = None  # [batch * length] bool: this batch's counted positions
        self._last: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def start_batch(self, attention_mask: torch.Tensor) -> None:
        self.keep = attention_mask.reshape(-1).bool()
        self._last = (None, None)

    def observer(self, name: str) -> Callable[[torch.Tensor], None]:
        def observe(x: torch.Tensor) -> None:
            assert self.keep is not None
            last_input, last_product = self._last
            if x is last_input and last_product is not None:
                product = last_product
            else:
                flat = x.reshape(-1, x.shape[-1])
                if flat.shape[0] != self.keep.shape[0]:
                    raise EvaluationError(
                        f"module {name}: its input {tuple(x.shape)} is not one row per token, so "
                        "its Gram cannot follow the attention mask"
                    )
                rows = flat[self.keep].to(torch.float64)
                product = rows.T @ rows
                self._last = (x, product)
            if name in self.grams:
                self.grams[name] += product
            else:
                self.grams[name] = product.clone()

        return observe


@dataclass(frozen=True)
class MergedLayers:
    """Modules whose merged delta is applied while a task's Grams are collected (RegMean++: every
    layer before the observed one); `delta(module)` gives it."""

    modules: tuple[str, ...]
    delta: Callable[[str], torch.Tensor]


class _AllInputsSeen(Exception):
    """Raised from an observer to end a forward pass once every observed module saw its input."""


def collect_grams(
    holder: ModelHolder,
    task: TaskConfig,
    adapter: LoraAdapter,
    head: Mapping[str, torch.Tensor],
    texts: Sequence[str],
    modules: Sequence[str],
    *,
    merged: MergedLayers | None = None,
    cancel: CancelToken | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """The raw Grams of `modules`' inputs over `texts` with `adapter` applied and `head` on, in
    one pass (all modules at once); returns them and the number of counted tokens.

    With `merged`, only `modules` carry the adapter's own delta, `merged.modules` carry the
    merged one, and each forward pass ends once every observed module has seen its input (a
    module called twice in one pass counts its calls up to then). `on_batch(done, total)` is
    called after each batch; `cancel` is checked before each."""
    accumulator = GramAccumulator()
    batches = length_sorted_batches(texts, task.batch_size)
    tokens = 0
    model = holder.model
    extra: dict[str, Any] = {}
    if holder.model_class == "causal_lm":
        extra["use_cache"] = False
        named = dict(model.named_modules())
        output_layer = model.get_output_embeddings()
        observed = {id(named[m]) for m in modules if m in named}
        if (output_layer is not None and id(output_layer) not in observed
                and "logits_to_keep" in inspect.signature(model.forward).parameters):
            extra["logits_to_keep"] = 1  # the logits are not needed; skip most of the output layer
    seen: set[str] = set()

    def observer(module: str) -> Callable[[torch.Tensor], None]:
        accumulate = accumulator.observer(module)
        if merged is None:
            return accumulate

        def observe(x: torch.Tensor) -> None:
            accumulate(x)
            seen.add(module)
            if len(seen) == len(modules):
                raise _AllInputsSeen

        return observe

    if merged is None:
        weights = holder.applied(MergeOutput.single(adapter), cancel)
    else:
        own = MergeOutput.single(adapter)
        before = set(merged.modules)
        weights = holder.deltas_applied(
            [*merged.modules, *modules], lambda m: merged.delta(m) if m in before else own.delta(m),
            adapter.fan_in_fan_out, cancel)
    with (weights, holder.head(head), holder.inputs_seen({m: observer(m) for m in modules}),
          torch.inference_mode()):
        for done, batch in enumerate(batches, start=1):
            check(cancel)
            encoded = right_padded(holder.tokenizer, task, [texts[i] for i in batch], holder.device)
            accumulator.start_batch(encoded["attention_mask"])
            seen.clear()
            tokens += int(encoded["attention_mask"].sum())
            try:
                model(**encoded, **extra)
            except _AllInputsSeen:
                pass
            if on_batch is not None:
                on_batch(done, len(batches))
    missing = sorted(set(modules) - set(accumulator.grams))
    if missing:
        raise EvaluationError(f"no input reached module(s) {', '.join(missing[:5])} during the forward pass")
    for module, gram in accumulator.grams.items():
        if not bool(torch.isfinite(gram).all()):
            raise EvaluationError(f"task {adapter.name!r}: the Gram of {module} holds NaN or Inf")
    return accumulator.grams, tokens


def cached_task_grams(root: Path, task: str, key: str, modules: Sequence[str]) -> TaskGrams | None:
    """The cached Grams of a key, if complete for `modules`."""
    manifest = grams_manifest_file(root, task, key)
    if not manifest.is_file():
        return None
    content = json.loads(manifest.read_text())
    if not set(modules) <= set(content.get("modules", [])):
        return None
    return TaskGrams(task=task, key=key, rows=content["rows"], tokens=content["tokens"], cached=True,
                     seconds=content["seconds"])


def write_task_grams(root: Path, task: str, key: str, grams: Mapping[str, torch.Tensor], *,
                     rows: int, tokens: int, seconds: float, settings: GramSettings) -> TaskGrams:
    """Write each module's Gram, then the manifest that marks the key complete (all atomic)."""
    for module, gram in grams.items():
        atomic_save_safetensors({"gram": gram}, gram_file(root, task, key, module))
    atomic_write_json(grams_manifest_file(root, task, key), {
        "task": task, "key": key, "modules": sorted(grams), "rows": rows, "tokens": tokens,
        "seconds": seconds, **asdict(settings),
    })
    return TaskGrams(task=task, key=key, rows=rows, tokens=tokens, cached=False, seconds=seconds)


@dataclass(frozen=True)
class GramJob:
    """One task's Grams to read or collect."""

    task: str
    config: TaskConfig
    adapter: LoraAdapter
    texts: list[str]  # the selected rows' inputs
    key: str


def gather_grams(
    holder: ModelHolder,
    root: Path,
    jobs: Sequence[GramJob],
    heads: Callable[[str], Mapping[str, torch.Tensor]],
    settings: GramSettings,
    *,
    cancel: CancelToken | None = None,
    progress: Progress | None = None,
) -> CachedGrams:
    """Each job's Grams from the cache, or collected now (and cached); progress counts batches
    over the tasks that need collecting."""
    entries: dict[str, TaskGrams] = {}
    todo = []
    for job in jobs:
        modules = sorted(job.adapter.modules)
        cached = cached_task_grams(root, job.task, job.key, modules)
        if cached is not None:
            entries[job.task] = cached
        else:
            todo.append(job)
    total = sum(len(length_sorted_batches(job.texts, job.config.batch_size)) for job in todo)
    done_before = 0
    for job in todo:
        started = time.perf_counter()

        def on_batch(done: int, batches: int, job: GramJob = job, offset: int = done_before) -> None:
            report(progress, offset + done, total, f"regmean grams {job.task}: batch {done}/{batches}")

        grams, tokens = collect_grams(holder, job.config, job.adapter, heads(job.task), job.texts,
                                      sorted(job.adapter.modules), cancel=cancel, on_batch=on_batch)
        seconds = round(time.perf_counter() - started, 4)
        entries[job.task] = write_task_grams(root, job.task, job.key, grams, rows=len(job.texts),
                                             tokens=tokens, seconds=seconds, settings=settings)
        done_before += len(length_sorted_batches(job.texts, job.config.batch_size))
        log.info("regmean grams of %s: %d rows, %d tokens, %d modules in %.2f s", job.task,
                 len(job.texts), tokens, len(grams), seconds)
        del grams
    return CachedGrams(root, [entries[job.task] for job in jobs], settings, holder.device)


def _forward_order(key: LayerKey | None) -> tuple[int, int]:
    """Sort key of a layer: a single stack's layers by index, an encoder's before a decoder's,
    modules outside any numbered layer last."""
    if key is None:
        return (3, 0)
    if isinstance(key, int):
        return (0, key)
    stack, index = key.split(".")
    return (1 if stack == "encoder" else 2, int(index))


def layer_groups(modules: Sequence[str]) -> list[list[str]]:
    """The modules grouped by transformer layer, in forward order."""
    keys = layer_keys(modules)
    groups: dict[LayerKey | None, list[str]] = {}
    for module in modules:
        groups.setdefault(keys[module], []).append(module)
    return [sorted(groups[key]) for key in sorted(groups, key=_forward_order)]


class SequentialGrams:
    """RegMean++'s Grams (a `merging_core.engine.merge.GramSource`): collected in `prepare`, layer
    by layer, each through the merge's own earlier layers, and held in memory until the merge
    solves their module (at most about two layers' worth at a time). Not cached: they depend on
    every adapter and on the merge's parameters."""

    def __init__(self, holder: ModelHolder, jobs: Sequence[GramJob],
                 heads: Callable[[str], Mapping[str, torch.Tensor]], settings: GramSettings,
                 modules: Sequence[str], *, cancel: CancelToken | None = None,
                 progress: Progress | None = None) -> None:
        self.holder, self.jobs, self.heads, self.settings = holder, list(jobs), heads, settings
        self.groups = layer_groups(modules)
        self.cancel, self.progress = cancel, progress
        self.prepared = False
        self._grams: dict[str, list[torch.Tensor]] = {}
        self._tasks = {job.task: TaskGrams(task=job.task, key="", rows=len(job.texts), tokens=0, cached=False,
                                           seconds=0.0) for job in self.jobs}

    def prepare(self, merged_delta: Callable[[str], torch.Tensor]) -> None:
        if self.prepared:
            return
        per_pass = {job.task: len(length_sorted_batches(job.texts, job.config.batch_size)) for job in self.jobs}
        total = len(self.groups) * sum(per_pass.values())
        done_before = 0
        for number, group in enumerate(self.groups):
            earlier = MergedLayers(tuple(m for g in self.groups[:number] for m in g), merged_delta)
            collected = []
            for job in self.jobs:
                started = time.perf_counter()

                def on_batch(done: int, batches: int, task: str = job.task, offset: int = done_before,
                             layer: int = number + 1) -> None:
                    report(self.progress, offset + done, total,
                           f"regmean++ grams, layer {layer}/{len(self.groups)}, {task}: batch {done}/{batches}")

                grams, tokens = collect_grams(self.holder, job.config, job.adapter, self.heads(job.task), job.texts,
                                              group, merged=earlier, cancel=self.cancel, on_batch=on_batch)
                entry = self._tasks[job.task]
                self._tasks[job.task] = TaskGrams(
                    task=job.task, key="", rows=entry.rows, tokens=tokens, cached=False,
                    seconds=round(entry.seconds + time.perf_counter() - started, 4))
                collected.append(grams)
                done_before += per_pass[job.task]
            for module in group:
                self._grams[module] = [grams[module] for grams in collected]
        self.prepared = True
        log.info("regmean++ grams of %s: %d layers in %.2f s", ", ".join(self._tasks), len(self.groups),
                 sum(entry.seconds for entry in self._tasks.values()))

    def grams(self, module: str) -> list[torch.Tensor]:
        if module not in self._grams:  # (while preparing, an earlier layer's are there already)
            if not self.prepared:
                raise EvaluationError("RegMean++ Grams are collected by prepare(merged_delta) before any solve")
            raise EvaluationError(f"module {module}: its RegMean++ Grams were not collected or were used already")
        return [gram.to(self.holder.device) for gram in self._grams.pop(module)]

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.settings), "plus": True, "layers": len(self.groups),
                "tasks": {task: asdict(entry) for task, entry in self._tasks.items()}}
