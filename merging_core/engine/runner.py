"""Executing a plan: load the adapters, run the optimizer, build the merge, write the bundle.

`execute(plan, session)` is the one place a merge is carried out (CLI, service and notebooks
all end here). Order: load the planned adapters (cached) -> the optimizer sets the lambda
policy (AdaMerging on the session's resident model) -> a data-aware method's Grams from the
session (RegMean; collected on the resident model or read from their cache; RegMean++ collects
them layer by layer through the merge's own earlier layers) and its per-module solves -> the
in-memory merge (`load_merge`) -> optionally save, into a hidden temp dir (`stage_merge`) ->
always write the run bundle and rename it into place (`publish_merge`), so a failed or cancelled
merge leaves no partial run directory. Staging and publishing are apart so
that a worker (e.g. a Ray actor) can compute and save while the process that owns the
artifacts writes the bundle.

`run_merge(config)` = `execute(plan_merge(config))`; `prepare_merge(config)` stops before
writing and returns the in-memory merge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from merging_core.adapters import AdapterCache, LoraAdapter
from merging_core.config.schema import MergeConfig
from merging_core.engine.merge import GramSource, MergeOutput
from merging_core.engine.plan import MergePlan, check_grams_available, plan_merge, plan_variant
from merging_core.engine.registry import get_method
from merging_core.engine.saving import save_merged_adapter
from merging_core.params import Params
from merging_core.plugins.optimizer_base import OptimizerContext, OptimizerSession
from merging_core.plugins.optimizers import get_optimizer
from merging_core.plugins.transforms import build_transform
from merging_core.runtime.cancel import CancelToken, Progress, check, report
from merging_core.runtime.io import atomic_write, atomic_write_json
from merging_core.runtime.metadata import library_versions, summarize
from merging_core.runtime.paths import (
    RUN_METADATA_FILE,
    RUN_SUMMARY_FILE,
    claim_run_dir,
    discard_run_dir,
    make_temp_run_dir,
    publish_run_dir,
    runs_dir,
)

log = logging.getLogger(__name__)

DEFAULT_ARTIFACTS_DIR = Path("artifacts")


class MergeSession(OptimizerSession, Protocol):
    """A session that executes plans (an `EvalSession` is one): what optimizers need, an
    adapter cache, each workspace task's evaluator kind, and the Grams of data-aware methods."""

    adapter_cache: AdapterCache

    def task_evaluators(self) -> dict[str, str]: ...

    def grams(self, adapters: Sequence[LoraAdapter], modules: Sequence[str], params: Params,
              cancel: CancelToken | None = None, progress: Progress | None = None) -> GramSource:
        """Each adapter's Gram matrices of its modules' inputs on its own task's data (collected
        on the resident model, or read from their cache)."""
        ...


@dataclass
class MergeResult:
    """What a merge produced: its tag, run bundle, saved adapter (if any) and the merge."""

    method: str
    params: Params
    merge_tag: str
    run_dir: Path
    adapter_path: Path | None
    metadata: dict[str, Any]
    output: MergeOutput


def load_merge(
    plan: MergePlan,
    *,
    session: MergeSession | None = None,
    adapter_cache: AdapterCache | None = None,
    cancel: CancelToken | None = None,
    progress: Progress | None = None,
) -> MergeOutput:
    """The in-memory merge of a plan: adapters loaded (from the cache), optimizer run; for a
    data-aware method, the Grams from the session and every module solved."""
    method = get_method(plan.method)
    if method.needs_grams:
        # A plan made without a workspace was refused already; this guards a plan executed
        # without the session that holds the model.
        check_grams_available(method, plan.adapter_names,
                              session.task_evaluators() if session is not None else None)
    if adapter_cache is None:
        adapter_cache = session.adapter_cache if session is not None else AdapterCache()
    adapters = [adapter_cache.load(ref.name, ref.path) for ref in plan.adapters]
    optimized = get_optimizer(plan.optimizer.name).run(
        OptimizerContext(method=plan.method, method_params=plan.params, policy=plan.policy,
                         adapters=adapters, modules=plan.modules, session=session, cancel=cancel,
                         progress=progress),
        plan.optimizer.params,
    )
    policy = optimized.policy
    if optimized.variant is not None:  # the optimizer chose the params too (`bayes`)
        plan = plan_variant(plan, *optimized.variant)
        policy = plan.policy
    grams = None
    if method.needs_grams:
        assert session is not None
        grams = session.grams(adapters, plan.modules, plan.params, cancel, progress)
    output = MergeOutput(
        method=method,
        adapters=adapters,
        modules=list(plan.modules),
        left_out=dict(plan.left_out),
        params=plan.params,
        policy=policy,
        transforms=[build_transform(t.name, t.params) for t in plan.transforms],
        merge_mode=plan.config.merge_mode,
        optimizer=plan.optimizer.describe(),
        optimizer_artifacts=optimized.artifacts,
        optimizer_summary=optimized.summary,
        grams=grams,
    )
    if grams is not None:
        grams.prepare(output.delta)
        # Solved now (and kept: the factors are LoRA-sized), so the run metadata shows what
        # every solve needed and evaluating and saving reuse the solves.
        for done, module in enumerate(output.modules, start=1):
            check(cancel)
            output.merge_module(module)
            report(progress, done, len(output.modules), f"{method.name}: solved {module}")
    return output


@dataclass
class StagedMerge:
    """A computed merge before its run bundle is published: the saved adapter (if any) already
    in a hidden temp directory under its runs directory, and what the bundle records.
    Picklable, so a worker can compute it and the process that owns the artifacts publish it
    (`publish_merge`); until then nothing of it is in the artifact layout."""

    runs_root: Path
    temp_dir: Path
    merge_tag: str
    saved: dict[str, Any] | None
    metadata: dict[str, Any]  # the bundle's metadata, less run id, run dir and times
    artifacts: dict[str, Any]  # the optimizer's files (JSON-able content or bytes)
    compute_s: float

    def discard(self) -> None:
        discard_run_dir(self.temp_dir)


def stage_merge(plan: MergePlan, output: MergeOutput, artifacts_dir: str | Path | None = None, *,
                save: bool | None = None, started: float | None = None,
                progress: Progress | None = None) -> StagedMerge:
    """Save the adapter (if asked) into a hidden temp run directory and describe the bundle.

    `artifacts_dir` overrides the config's `output_dir`; `save` overrides `save_merged`."""
    config = plan.config
    do_save = config.save_merged if save is None else save
    root = Path(artifacts_dir or config.output_dir or DEFAULT_ARTIFACTS_DIR)
    runs_root = runs_dir(root, plan.method, output.adapter_names)
    temp_dir = make_temp_run_dir(runs_root)
    try:
        saved = None
        if do_save:
            saved = save_merged_adapter(output, temp_dir, save_rank=config.save_rank, progress=progress)
        metadata: dict[str, Any] = {
            "method": plan.method,
            "merge_tag": output.merge_tag,
            "merge_mode": config.merge_mode,
            "params": output.params,
            "method_params": dict(config.method_params),
            "lambda_policy": output.policy.describe(output.params.get("lambda")),
            "transforms": [t.describe() for t in output.transforms],
            "optimizer": {**output.optimizer, "summary": output.optimizer_summary,
                          "artifacts": sorted(output.optimizer_artifacts)},
            "method_summary": output.method_summary(),
            "adapters": [a.describe() for a in output.adapters],
            "num_modules": len(output.modules),
            "modules": output.modules,
            "left_out": output.left_out,
            "saved": saved,
            "versions": library_versions(),
        }
    except BaseException:
        discard_run_dir(temp_dir)
        raise
    return StagedMerge(runs_root=runs_root, temp_dir=temp_dir, merge_tag=output.merge_tag, saved=saved,
                       metadata=metadata, artifacts=dict(output.optimizer_artifacts),
                       compute_s=time.perf_counter() - (started if started is not None else time.perf_counter()))


def publish_merge(staged: StagedMerge) -> tuple[Path, dict[str, Any]]:
    """Write the bundle's files into the staged directory and rename it into place as
    `runs/run_<time>`; returns the run directory and its metadata. On any failure nothing of
    the bundle is left."""
    started = time.perf_counter()
    final_dir: Path | None = None
    try:
        created = datetime.now(UTC)
        final_dir = claim_run_dir(staged.runs_root, created)
        metadata: dict[str, Any] = {
            "run_id": final_dir.name,
            "run_dir": str(final_dir),
            **staged.metadata,
            "created_at": created.isoformat(),
            "duration_s": round(staged.compute_s + time.perf_counter() - started, 4),
        }
        temp_dir = staged.temp_dir
        for name, content in staged.artifacts.items():
            if isinstance(content, bytes):
                atomic_write(temp_dir / name, lambda temp, data=content: temp.write_bytes(data))
            else:
                atomic_write_json(temp_dir / name, content)
        atomic_write_json(temp_dir / RUN_METADATA_FILE, metadata)
        atomic_write_json(temp_dir / RUN_SUMMARY_FILE, summarize(metadata))
        publish_run_dir(temp_dir, final_dir)
    except BaseException:
        discard_run_dir(staged.temp_dir, final_dir)
        raise
    log.info("merge %s written to %s", staged.merge_tag, final_dir)
    return final_dir, metadata


def execute(
    plan: MergePlan,
    session: MergeSession | None = None,
    *,
    artifacts_dir: str | Path | None = None,
    save: bool | None = None,
    adapter_cache: AdapterCache | None = None,
    cancel: CancelToken | None = None,
    progress: Progress | None = None,
) -> MergeResult:
    """Load, optimise, merge and write the run bundle (saving the adapter if asked).

    `artifacts_dir` overrides the config's `output_dir`; `save` overrides `save_merged`.
    """
    started = time.perf_counter()
    output = load_merge(plan, session=session, adapter_cache=adapter_cache, cancel=cancel,
                        progress=progress)
    staged = stage_merge(plan, output, artifacts_dir, save=save, started=started, progress=progress)
    final_dir, metadata = publish_merge(staged)
    return MergeResult(
        method=plan.method,
        params=output.params,
        merge_tag=output.merge_tag,
        run_dir=final_dir,
        adapter_path=final_dir if staged.saved else None,
        metadata=metadata,
        output=output,
    )


def _plan(config: MergeConfig | Mapping[str, Any], registry: Mapping[str, Path] | None,
          session: MergeSession | None, adapter_cache: AdapterCache | None) -> MergePlan:
    evaluators = session.task_evaluators() if session is not None else None
    cache = adapter_cache or (session.adapter_cache if session is not None else None)
    return plan_merge(config, registry, adapter_cache=cache, task_evaluators=evaluators)


def prepare_merge(
    config: MergeConfig | Mapping[str, Any],
    *,
    task_registry: Mapping[str, Path] | None = None,
    adapter_cache: AdapterCache | None = None,
    session: MergeSession | None = None,
    cancel: CancelToken | None = None,
    progress: Progress | None = None,
) -> MergeOutput:
    """Plan and load a merge in memory; writes nothing. `session` gives optimizers such as
    adamerging the resident model and the task data."""
    plan = _plan(config, task_registry, session, adapter_cache)
    return load_merge(plan, session=session, adapter_cache=adapter_cache, cancel=cancel,
                      progress=progress)


def run_merge(
    config: MergeConfig | Mapping[str, Any],
    *,
    task_registry: Mapping[str, Path] | None = None,
    artifacts_dir: str | Path | None = None,
    save: bool | None = None,
    progress: Progress | None = None,
    session: MergeSession | None = None,
    cancel: CancelToken | None = None,
) -> MergeResult:
    """Plan and execute a merge: always write a run bundle, save the adapter if asked.

    `task_registry` maps task names to adapter directories (see `load_task_registry`).
    `progress(done, total, message, extra)` sees the optimizer's steps and the saved modules.
    """
    plan = _plan(config, task_registry, session, None)
    return execute(plan, session, artifacts_dir=artifacts_dir, save=save, cancel=cancel,
                   progress=progress)
