"""Evaluate merges on the resident model against each task's own adapter.

An `EvalSession` belongs to one worker: it owns the model holder and caches task data, heads,
loaded adapters and reference metrics. It computes `EvaluationResult`s (`evaluation.results`);
`evaluation.writer.EvalWriter` puts them into the artifact layout. Reference and base metrics
are caches, written here (`runtime.paths.cached_metrics_file`):

    <root>/<task>/metrics/eval/<split>[/<subset>]/reference/metrics.json (the task's own adapter)
    <root>/<task>/metrics/eval/<split>[/<subset>]/base/metrics.json      (the base model)

The session is also what optimizers run against (`plugins.optimizer_base.OptimizerSession`):
the holder, each task's evaluator, max length, head and unlabeled inputs; and what data-aware
methods get their Gram matrices from (`grams`, collected and cached by `evaluation.grams`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from merging_core.adapters import AdapterCache, LoraAdapter, load_adapter
from merging_core.config.schema import EvalSubsetConfig
from merging_core.engine.merge import MergeOutput
from merging_core.errors import EvaluationError, ParamError
from merging_core.evaluation.data import TaskData, load_task_data
from merging_core.evaluation.evaluators import EvalContext, EvalMetrics, get_evaluator
from merging_core.evaluation.grams import (
    GRAM_EVALUATORS,
    CachedGrams,
    GramJob,
    GramSettings,
    SequentialGrams,
    gather_grams,
    gram_key,
    select_rows,
)
from merging_core.evaluation.holder import ModelHolder
from merging_core.evaluation.results import (
    EvaluationResult,
    TaskResult,
    interference_delta,
    normalized_score,
)
from merging_core.evaluation.subsets import (
    subset_indices,
    subset_namespace,
    subset_spec,
)
from merging_core.evaluation.workspace import Workspace
from merging_core.evaluation.writer import EvalWriter, IndexListener
from merging_core.plugins.optimizer_base import ResidentModel
from merging_core.runtime.cancel import CancelToken, Progress, check, report
from merging_core.runtime.io import atomic_write_json
from merging_core.runtime.paths import RUN_METADATA_FILE, cached_metrics_file

log = logging.getLogger(__name__)
CACHE_LOCK_TIMEOUT_S = 3600  # another worker computing the same reference metrics

__all__ = ["EvalSession", "EvaluationResult", "TaskResult", "interference_delta", "normalized_score",
           "subset_namespace"]


class EvalSession:
    """Evaluation on one resident model, with caches; one per worker."""

    def __init__(
        self,
        workspace: Workspace,
        holder: ModelHolder,
        artifacts_dir: str | Path,
        *,
        index_listener: IndexListener | None = None,
    ) -> None:
        """`index_listener(index_path, entry)` is called after each index append (e.g. to
        mirror the index into a database)."""
        self.workspace = workspace
        self.holder = holder
        self.root = Path(artifacts_dir)
        self.writer = EvalWriter(self.root, index_listener)
        self.adapter_cache = AdapterCache()
        self._data: dict[tuple[str, str], TaskData] = {}
        self._labels: dict[str, list[str]] = {}
        self._cache_keys: dict[tuple[str, str, str, str | None], str] = {}

    @classmethod
    def from_workspace(
        cls,
        workspace: Workspace,
        artifacts_dir: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        index_listener: IndexListener | None = None,
    ) -> EvalSession:
        base = workspace.spec.base_model
        holder = ModelHolder(
            workspace.base_model_path(), model_class=base.model_class, dtype=dtype or base.dtype,
            device=device or base.device,
        )
        return cls(workspace, holder, artifacts_dir, index_listener=index_listener)

    # --- data, labels, heads ---------------------------------------------------------------

    def split_data(self, task: str, split: str) -> TaskData:
        """A task's split, loaded once."""
        key = (task, split)
        if key not in self._data:
            config = self.workspace.task(task)
            evaluator = get_evaluator(config.evaluator)
            audio = (self.holder.audio_columns(config.audio_column, config.sample_rate_column)
                     if config.audio_column is not None else None)
            data = load_task_data(
                self.workspace.data_path(task, split),
                text_column=config.text_column,
                label_column=config.label_column if evaluator.needs_labels else None,
                reference_column=None if evaluator.needs_labels else config.reference_column,
                prompt_template=config.prompt_template,
                audio=audio,
            )
            if data.clips is not None:
                self.holder.clips.update(data.clips)
            self._data[key] = data
        return self._data[key]

    def labels(self, task: str) -> list[str]:
        """The head's label order: the workspace's `labels`, else sorted train labels."""
        if task not in self._labels:
            config = self.workspace.task(task)
            if config.labels is not None:
                self._labels[task] = list(config.labels)
            elif not get_evaluator(config.evaluator).needs_labels:
                self._labels[task] = []
            else:
                source = "train" if "train" in config.data else next(iter(config.data))
                self._labels[task] = sorted(set(self.split_data(task, source).labels or []))
        return self._labels[task]

    def task_data(
        self, task: str, split: str, subset: EvalSubsetConfig | None
    ) -> tuple[TaskData, str | None]:
        data = self.split_data(task, split)
        spec = subset_spec(subset, task)
        if spec is None:
            return data, None
        indices = subset_indices(data, spec, task=task, split=split, artifacts_dir=self.root)
        return data.select(indices), spec.tag

    def adapter(self, task: str) -> LoraAdapter:
        """Task t's own adapter (loaded once)."""
        return self.adapter_cache.load(task, self.workspace.adapter_path(task))

    def task_output(self, task: str) -> MergeOutput:
        """Task t's own adapter as a merge of one (delta = its LoRA delta exactly)."""
        return MergeOutput.single(self.adapter(task))

    def saved_output(self, adapter_dir: str | Path) -> tuple[MergeOutput, dict[str, Any]]:
        """A saved adapter (e.g. a run bundle) as a merge of one, plus its run metadata if any.

        It is applied through the same holder as in-memory merges: nothing reloads the base.
        """
        path = Path(adapter_dir)
        output = MergeOutput.single(load_adapter(path))
        metadata_file = path / RUN_METADATA_FILE
        metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
        return output, metadata

    def evaluate_saved(self, adapter_dir: str | Path, **kwargs: Any) -> EvaluationResult:
        """Evaluate a saved adapter; results land beside the merge it came from, if known."""
        output, metadata = self.saved_output(adapter_dir)
        names = [a["name"] for a in metadata.get("adapters", [])] or output.adapter_names
        if not kwargs.get("tasks"):
            kwargs["tasks"] = [n for n in names if n in self.workspace.tasks] or None
        return self.evaluate_merge(
            output,
            merge_tag=f"saved_{metadata.get('merge_tag', Path(adapter_dir).name)}",
            layout=(metadata.get("method", "saved"), names),
            run_dir=Path(adapter_dir) if metadata else None,
            **kwargs,
        )

    # --- what optimizers see (plugins.optimizer_base.OptimizerSession) ------------------------

    def evaluator_of(self, task: str) -> str:
        return self.workspace.task(task).evaluator

    def task_evaluators(self) -> dict[str, str]:
        return self.workspace.task_evaluators()

    def max_length(self, task: str) -> int:
        return self.workspace.task(task).max_length

    def unlabeled_texts(self, task: str, split: str) -> list[str]:
        """A split's inputs, labels unused."""
        return list(self.split_data(task, split).texts)

    def head(self, task: str) -> dict[str, torch.Tensor]:
        heads = self.adapter(task).heads
        if not heads and self.holder.model_class == "sequence_classification":
            raise EvaluationError(
                f"task {task!r}: its adapter has no classification head (modules_to_save); "
                "sequence classification needs the task's own head"
            )
        return heads

    def prediction_entropy(self, task: str, texts: Sequence[str], holder: ResidentModel) -> torch.Tensor:
        """The mean entropy of the model's own predictions for task t on `texts` (with task t's
        head on), as t's evaluator defines it; differentiable. AdaMerging's objective."""
        config = self.workspace.task(task)
        entropy = get_evaluator(config.evaluator).entropy
        if entropy is None:
            raise EvaluationError(f"evaluator {config.evaluator!r} of task {task!r} defines no prediction entropy")
        with holder.head(self.head(task)):
            return entropy(holder, config, texts, self.labels(task))

    # --- what data-aware methods see (engine.merge.GramSource) ------------------------------

    def grams(
        self,
        adapters: Sequence[LoraAdapter],
        modules: Sequence[str],
        params: Mapping[str, Any],
        cancel: CancelToken | None = None,
        progress: Progress | None = None,
    ) -> CachedGrams | SequentialGrams:
        """Each adapter's Gram matrices of its modules' inputs, on its task's inputs with its own
        adapter applied (`samples_per_task`, `split` and `seed` from `params`): read from the
        cache, or collected on the resident model now and cached. With `plus` (RegMean++), taken
        through the merge's own earlier layers when the merge prepares them, and not cached.
        Each adapter must be a workspace task (its data is the task's)."""
        settings = GramSettings(samples_per_task=int(params["samples_per_task"]),
                                split=str(params["split"]), seed=int(params["seed"]))
        jobs = []
        for adapter in adapters:
            if adapter.name not in self.workspace.tasks:
                raise ParamError(
                    f"adapter {adapter.name!r} is not a task of workspace {self.workspace.name!r} "
                    f"(tasks: {', '.join(self.workspace.tasks)}); Grams are collected on each "
                    "adapter's own task data"
                )
            config = self.workspace.task(adapter.name)
            if config.evaluator not in GRAM_EVALUATORS:
                raise ParamError(
                    f"task {adapter.name!r} uses evaluator {config.evaluator!r}; Grams are collected "
                    f"for tasks scored by {', '.join(GRAM_EVALUATORS)}"
                )
            missing = sorted(set(modules) - set(adapter.modules))
            if missing:
                raise ParamError(f"adapter {adapter.name!r} lacks module(s) {', '.join(missing[:5])}")
            data = self.split_data(adapter.name, settings.split)
            rows = select_rows(len(data), settings.samples_per_task, settings.seed)
            key = gram_key(model_path=self.holder.model_path, dtype=self.holder.dtype,
                           model_class=self.holder.model_class, adapter=adapter,
                           data_checksum=data.checksum(), task=config, settings=settings)
            jobs.append(GramJob(task=adapter.name, config=config, adapter=adapter,
                                texts=[data.texts[i] for i in rows], key=key))
        if params.get("plus", False):
            return SequentialGrams(self.holder, jobs, self.head, settings, modules, cancel=cancel,
                                   progress=progress)
        return gather_grams(self.holder, self.root, jobs, self.head, settings, cancel=cancel,
                            progress=progress)

    # --- evaluation --------------------------------------------------------------------------

    def evaluate_task(
        self,
        task: str,
        split: str,
        subset: EvalSubsetConfig | None,
        *,
        cancel: CancelToken | None = None,
        progress: Progress | None = None,
    ) -> EvalMetrics:
        """Evaluate whatever weights are applied now, with task t's own head."""
        config = self.workspace.task(task)
        data, _ = self.task_data(task, split, subset)
        context = EvalContext(
            holder=self.holder, task=config, data=data, labels=self.labels(task), cancel=cancel,
            progress=progress,
        )
        with self.holder.head(self.head(task)):
            return get_evaluator(config.evaluator).evaluate(context)

    def evaluate_output(
        self,
        output: MergeOutput | None,
        tasks: Sequence[str],
        split: str,
        subset: EvalSubsetConfig | None,
        *,
        cancel: CancelToken | None = None,
        progress: Progress | None = None,
    ) -> dict[str, EvalMetrics]:
        """Apply the merge once, evaluate every task, restore (also on error or cancel)."""
        results: dict[str, EvalMetrics] = {}
        with self.holder.applied(output, cancel):
            for done, task in enumerate(tasks):
                check(cancel)
                report(progress, done, len(tasks), f"evaluating {task}")
                results[task] = self.evaluate_task(task, split, subset, cancel=cancel)
        report(progress, len(tasks), len(tasks), "evaluated")
        return results

    def _cached_metrics(
        self, kind: str, task: str, split: str, subset: EvalSubsetConfig | None, key: str,
        output: MergeOutput | None, cancel: CancelToken | None,
    ) -> EvalMetrics:
        namespace = subset_namespace(subset)
        path = cached_metrics_file(self.root, task, split, namespace, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Under a file lock: workers sharing the artifacts (Ray actors) compute each once.
        with FileLock(str(path) + ".lock", timeout=CACHE_LOCK_TIMEOUT_S):
            if path.is_file():
                cached = json.loads(path.read_text())
                if cached.get("key") == key:
                    return EvalMetrics.from_dict(cached["metrics"])
            metrics = self.evaluate_output(output, [task], split, subset, cancel=cancel)[task]
            atomic_write_json(path, {"task": task, "split": split, "subset": namespace, "kind": kind,
                                     "key": key, "metrics": metrics.to_dict()})
        return metrics

    def reference(
        self, task: str, split: str, subset: EvalSubsetConfig | None,
        cancel: CancelToken | None = None,
    ) -> EvalMetrics:
        """Task t's own adapter on (split, subset): computed once, cached on disk."""
        key = self._cache_key("reference", task, split, subset)
        return self._cached_metrics("reference", task, split, subset, key, self.task_output(task), cancel)

    def base_metrics(
        self, task: str, split: str, subset: EvalSubsetConfig | None,
        cancel: CancelToken | None = None,
    ) -> EvalMetrics:
        """The base model with task t's head: no LoRA delta at all."""
        key = self._cache_key("base", task, split, subset)
        return self._cached_metrics("base", task, split, subset, key, None, cancel)

    def _cache_key(self, kind: str, task: str, split: str, subset: EvalSubsetConfig | None) -> str:
        """What a cached reference or base metric depends on: the task's adapter file (its head
        too), the base model and dtype, the task's settings, and the evaluated rows."""
        memo = (kind, task, split, subset_namespace(subset))
        if memo not in self._cache_keys:
            adapter = self.adapter(task)
            data, _ = self.task_data(task, split, subset)
            self._cache_keys[memo] = hashlib.sha256(json.dumps([
                kind, adapter.checksums.get("adapter_model.safetensors", ""), str(self.holder.model_path),
                str(self.holder.dtype), self.workspace.task(task).model_dump(mode="json"), data.checksum(),
            ], sort_keys=True).encode()).hexdigest()
        return self._cache_keys[memo]

    def evaluate_merge(
        self,
        output: MergeOutput,
        *,
        merge_tag: str,
        tasks: Sequence[str] | None = None,
        split: str = "test",
        subset: EvalSubsetConfig | None = None,
        run_dir: Path | None = None,
        entry_id: str | None = None,
        record: Mapping[str, Any] | None = None,
        with_base: bool = True,
        write: bool = True,
        layout: tuple[str, list[str]] | None = None,
        cancel: CancelToken | None = None,
        progress: Progress | None = None,
    ) -> EvaluationResult:
        """Evaluate a merge on `tasks` (default: the merged adapters that are workspace tasks),
        and compute interference against each task's own adapter. With `write` (default) the
        session's `EvalWriter` files the result (`run_dir` gets a copy); without it, nothing
        is written but the reference/base caches, and the caller writes the result.

        `layout` = (method, adapter names) files the results under another merge's directory
        (used for saved adapters)."""
        tasks = list(tasks) if tasks else [n for n in output.adapter_names if n in self.workspace.tasks]
        if not tasks:
            raise EvaluationError(
                "no task to evaluate: give eval_tasks, or merge adapters named by workspace tasks"
            )
        for task in tasks:
            self.workspace.task(task)  # unknown task -> ConfigError naming the known ones
        merged = self.evaluate_output(output, tasks, split, subset, cancel=cancel, progress=progress)
        results = {}
        for task in tasks:
            reference = self.reference(task, split, subset, cancel)
            base = self.base_metrics(task, split, subset, cancel) if with_base else None
            direction = merged[task].direction
            results[task] = TaskResult(
                task=task,
                merged=merged[task],
                reference=reference,
                base=base,
                interference_delta=interference_delta(merged[task].primary, reference.primary, direction),
                normalized=normalized_score(merged[task].primary, reference.primary, direction),
            )
        method, adapter_names = layout or (output.method.name, output.adapter_names)
        result = EvaluationResult(
            id=entry_id or uuid.uuid4().hex,
            merge_tag=merge_tag,
            method=method,
            adapters=list(adapter_names),
            split=split,
            subset=subset_namespace(subset),
            tasks=results,
            params=dict(output.params),
            lambda_policy=output.policy.describe(output.params.get("lambda")),
            extra=dict(record or {}),
        )
        if write:
            self.writer.write(result, run_dir)
        return result
