"""`run_merge`: the single entry point for a merge (CLI, service and notebooks all use it).

Order: validate the spec (method, params, policy, plugins) -> resolve and load adapters ->
check compatibility -> optimizer hook sets the lambda policy -> build the in-memory merge ->
optionally save -> always write the run bundle. Every check happens before anything is
written, and the bundle is built in a hidden temp dir that is renamed into place only when
complete, so a failed merge leaves no partial run directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from merging_core.adapters import (
    LoraAdapter,
    check_compatible,
    load_adapter,
    resolve_adapter_specs,
)
from merging_core.config.loader import parse_merge_config
from merging_core.config.schema import LambdaPolicyConfig, MergeConfig, MergeSpec
from merging_core.engine.merge import MergeOutput
from merging_core.engine.registry import MergeMethod, get_method
from merging_core.engine.saving import ProgressFn, save_merged_adapter
from merging_core.errors import IncompatibleAdaptersError, ParamError
from merging_core.params import Params
from merging_core.plugins.optimizers import OptimizerContext, build_optimizer
from merging_core.plugins.transforms import Transform, build_transform
from merging_core.policies import LambdaPolicy
from merging_core.runtime.io import atomic_write, atomic_write_json
from merging_core.runtime.metadata import library_versions, summarize
from merging_core.runtime.paths import (
    claim_run_dir,
    discard_run_dir,
    make_temp_run_dir,
    merged_dir,
    publish_run_dir,
)

log = logging.getLogger(__name__)

DEFAULT_ARTIFACTS_DIR = Path("artifacts")


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


def _build_policy(
    config: LambdaPolicyConfig, method: MergeMethod, params: Params, n_adapters: int
) -> LambdaPolicy:
    if config.type == "scalar" and config.default is None:
        return LambdaPolicy()
    spec = method.param_index.get("lambda")
    if spec is None:
        raise ParamError(
            f"lambda_policy {config.type!r} needs a method with a `lambda` parameter; "
            f"{method.name!r} has none"
        )
    owner = f"lambda_policy.overrides for method {method.name!r}"
    overrides = {}
    for layer, value in config.overrides.items():
        overrides[int(layer)] = spec.validate(f"{owner} (layer {layer})", value, n_adapters)
        if method.params_validator is not None:
            try:
                method.params_validator({**params, "lambda": overrides[int(layer)]}, n_adapters)
            except ValueError as exc:
                raise ParamError(f"{owner} (layer {layer}): {exc}") from exc
    return LambdaPolicy(kind=config.type, overrides=overrides)


def _method_params(spec: MergeSpec, method: MergeMethod) -> Params:
    params = dict(spec.method_params)
    # A policy default stands in for method_params.lambda.
    if spec.lambda_policy.default is not None:
        if "lambda" in params and params["lambda"] != spec.lambda_policy.default:
            raise ParamError(
                "method_params.lambda and lambda_policy.default disagree; set only one"
            )
        params["lambda"] = spec.lambda_policy.default
    return method.normalize_params(params, len(spec.adapters))


def _check_method_fits(output: MergeOutput) -> None:
    if output.method.space == "factors":
        if any(not t.is_identity for t in output.transforms):
            raise ParamError(
                f"method {output.method.name!r} works on LoRA factors; transforms act on dense "
                "deltas, so use a delta-space method (e.g. weighted_delta) with transforms"
            )
    if output.method.same_rank:
        unequal = [
            m for m in output.modules if len({a.modules[m].rank for a in output.adapters}) > 1
        ]
        if unequal:
            raise IncompatibleAdaptersError(
                f"method {output.method.name!r} needs equal ranks in every module; ranks differ "
                f"in {', '.join(unequal[:5])}; use weighted_delta for adapters of different ranks"
            )


def prepare_merge(
    spec: MergeSpec | MergeConfig | Mapping[str, Any],
    *,
    task_registry: Mapping[str, Path] | None = None,
    adapter_cache: dict[str, LoraAdapter] | None = None,
    session: Any = None,
    cancel: Any = None,
    progress: Any = None,
) -> MergeOutput:
    """Validate a spec and load its adapters into an in-memory merge; writes nothing.

    `adapter_cache` (keyed by name and path) lets sweeps and the service load each adapter once.
    `session` (an EvalSession) gives optimizers such as adamerging the resident model and data.
    """
    if isinstance(spec, Mapping):
        spec = parse_merge_config(dict(spec))
    method = get_method(spec.method)
    n_adapters = len(spec.adapters)
    method.check_adapter_count(n_adapters)
    params = _method_params(spec, method)
    policy = _build_policy(spec.lambda_policy, method, params, n_adapters)
    transforms: list[Transform] = [build_transform(t.name, t.params) for t in spec.transforms]
    optimizer, optimizer_params = build_optimizer(spec.optimizer.name, spec.optimizer.params)

    resolved = resolve_adapter_specs(spec.adapters, registry=task_registry)
    adapters = []
    for name, path in resolved:
        key = f"{name}::{Path(path).resolve()}"
        if adapter_cache is not None and key in adapter_cache:
            adapters.append(adapter_cache[key])
            continue
        adapter = load_adapter(path, name)
        if adapter_cache is not None:
            adapter_cache[key] = adapter
        adapters.append(adapter)
    modules, left_out = check_compatible(adapters, spec.merge_mode)
    if left_out:
        log.info("merge_mode=common leaves out modules: %s", left_out)

    context = OptimizerContext(method, params, policy, adapters, modules, session=session,
                               cancel=cancel, progress=progress)
    optimized = optimizer.propose(context, optimizer_params)
    policy = optimized.policy
    output = MergeOutput(
        method=method,
        adapters=adapters,
        modules=modules,
        left_out=left_out,
        params=params,
        policy=policy,
        transforms=transforms,
        merge_mode=spec.merge_mode,
        optimizer={"name": spec.optimizer.name, "params": dict(spec.optimizer.params)},
        optimizer_artifacts=optimized.artifacts,
        optimizer_summary=optimized.summary,
    )
    _check_method_fits(output)
    return output


def run_merge(
    config: MergeSpec | MergeConfig | Mapping[str, Any],
    *,
    task_registry: Mapping[str, Path] | None = None,
    artifacts_dir: str | Path | None = None,
    save: bool | None = None,
    progress: ProgressFn | None = None,
    session: Any = None,
    cancel: Any = None,
) -> MergeResult:
    """Merge the adapters as configured; always write a run bundle, save the adapter if asked.

    `task_registry` maps task names to adapter directories (see `load_task_registry`).
    `artifacts_dir` overrides `output_dir`; `save` overrides `save_merged`.
    """
    started = time.perf_counter()
    if isinstance(config, Mapping):
        config = parse_merge_config(dict(config))
    spec = config.to_spec() if isinstance(config, MergeConfig) else config
    output = prepare_merge(
        spec,
        task_registry=task_registry,
        adapter_cache=session.adapter_cache if session is not None else None,
        session=session,
        cancel=cancel,
        progress=(lambda done, total, message, extra: progress(done, total, message))
        if progress is not None else None,
    )
    method, params = output.method, output.params
    do_save = spec.save_merged if save is None else save
    root = Path(artifacts_dir or spec.output_dir or DEFAULT_ARTIFACTS_DIR)

    policy_description = output.policy.describe(params.get("lambda"))
    transforms = [t.describe() for t in output.transforms]
    tag = output.merge_tag
    runs_root = merged_dir(root, method.name, output.adapter_names) / "runs"
    temp_dir = make_temp_run_dir(runs_root)
    final_dir: Path | None = None
    try:
        created = datetime.now(timezone.utc)
        final_dir = claim_run_dir(runs_root, created)
        saved = None
        if do_save:
            saved = save_merged_adapter(output, temp_dir, save_rank=spec.save_rank, progress=progress)
        metadata: dict[str, Any] = {
            "run_id": final_dir.name,
            "run_dir": str(final_dir),
            "method": method.name,
            "merge_tag": tag,
            "merge_mode": spec.merge_mode,
            "params": params,
            "method_params": dict(spec.method_params),
            "lambda_policy": policy_description,
            "transforms": transforms,
            "optimizer": {**output.optimizer, "summary": output.optimizer_summary,
                          "artifacts": sorted(output.optimizer_artifacts)},
            "adapters": [a.describe() for a in output.adapters],
            "num_modules": len(output.modules),
            "modules": output.modules,
            "left_out": output.left_out,
            "saved": saved,
            "versions": library_versions(),
            "created_at": created.isoformat(),
            "duration_s": round(time.perf_counter() - started, 4),
        }
        for name, content in output.optimizer_artifacts.items():
            if isinstance(content, bytes):
                atomic_write(temp_dir / name, lambda temp, data=content: temp.write_bytes(data))
            else:
                atomic_write_json(temp_dir / name, content)
        atomic_write_json(temp_dir / "merge_metadata.json", metadata)
        atomic_write_json(temp_dir / "summary.json", summarize(metadata))
        publish_run_dir(temp_dir, final_dir)
    except BaseException:
        discard_run_dir(temp_dir, final_dir)
        raise
    log.info("merge %s written to %s", tag, final_dir)
    return MergeResult(
        method=method.name,
        params=params,
        merge_tag=tag,
        run_dir=final_dir,
        adapter_path=final_dir if saved else None,
        metadata=metadata,
        output=output,
    )
