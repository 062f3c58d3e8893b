"""`lora-merge`: the command-line interface (the seed's `main.py merge|merge-sweep|evaluate-merged`).

    lora-merge merge --config configs/merge/merge_ties.yaml --save
    lora-merge merge --adapters intent sentiment --method weighted --lambda 0.7 --workspace ws.yaml
    lora-merge evaluate --config configs/merge/merge_ties.yaml --workspace ws.yaml
    lora-merge evaluate --adapter artifacts/merged/ties/.../runs/run_... --workspace ws.yaml
    lora-merge sweep --config configs/merge/merge_weighted_delta_sweep_bayes.yaml --workspace ws.yaml
    lora-merge methods
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from merging_core.adapters import load_task_registry
from merging_core.config import load_merge_config, parse_merge_config
from merging_core.engine import list_methods
from merging_core.engine.runner import run_merge
from merging_core.errors import MergeError
from merging_core.runtime.memory import release_freed_memory_promptly


def _value(text: str) -> Any:
    """Parse a CLI value as YAML, so `0.5`, `[0.2, 0.8]` and `true` get their types."""
    return yaml.safe_load(text)


def _merge_config(args: argparse.Namespace) -> Any:
    if args.config:
        config = load_merge_config(args.config)
        data = config.model_dump(exclude_unset=True)
    else:
        if not args.adapters or not args.method:
            raise MergeError("give --config, or both --adapters and --method")
        data = {}
    if args.adapters:
        data["adapters"] = args.adapters
    if args.method:
        data["method"] = args.method
    params = dict(data.get("method_params") or {})
    if args.lambda_ is not None:
        params["lambda"] = _value(args.lambda_)
    for item in args.param:
        key, sep, text = item.partition("=")
        if not sep:
            raise MergeError(f"--param expects NAME=VALUE, got {item!r}")
        params[key] = _value(text)
    data["method_params"] = params
    if args.merge_mode:
        data["merge_mode"] = args.merge_mode
    if args.save_rank:
        data["save_rank"] = args.save_rank
    return parse_merge_config(data, args.config or "(command line)")


def _cmd_merge(args: argparse.Namespace) -> int:
    config = _merge_config(args)
    workspace = _workspace_path(args)
    registry = load_task_registry(workspace) if args.workspace or workspace.is_file() else None
    session = _session(args) if config.optimizer.name != "none" else None
    bar = _ProgressBar(config.optimizer.name)
    try:
        result = run_merge(
            config,
            task_registry=registry,
            artifacts_dir=args.output_dir,
            save=True if args.save else None,
            session=session,
            progress=(lambda done, total, message: bar(done, total, message, {})),
        )
    finally:
        bar.close()
    summary = {
        "merge_tag": result.merge_tag,
        "run_dir": str(result.run_dir),
        "adapter_path": str(result.adapter_path) if result.adapter_path else None,
        "num_modules": len(result.output.modules),
        "left_out": result.output.left_out,
    }
    print(json.dumps(summary, indent=2))
    return 0


DEFAULT_WORKSPACE = Path("workspaces/demo/workspace.yaml")


def _workspace_path(args: argparse.Namespace) -> Path:
    path = args.workspace or os.environ.get("LORA_MERGE_WORKSPACE") or DEFAULT_WORKSPACE
    return Path(path)


class _ProgressBar:
    """A tqdm bar on a terminal, log lines otherwise."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: Any = None

    def __call__(self, done: int, total: int, message: str, extra: dict[str, Any]) -> None:
        best = extra.get("best")
        suffix = f" best={best['objective']:.4f}" if best else ""
        if not sys.stderr.isatty():
            logging.getLogger("lora-merge").info("%s %d/%d %s%s", self.description, done, total,
                                                 message, suffix)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.description, file=sys.stderr)
        self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix_str(f"{message}{suffix}", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _session(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from merging_core.evaluation.evaluate import EvalSession
    from merging_core.evaluation.workspace import load_workspace

    workspace = load_workspace(_workspace_path(args))
    return EvalSession.from_workspace(workspace, args.output_dir or "artifacts",
                                      device=getattr(args, "device", None))


def _subset(args: argparse.Namespace, config: Any) -> Any:
    if args.max_samples:
        from merging_core.config import EvalSubsetConfig

        return EvalSubsetConfig(max_samples=args.max_samples, stratified=True)
    return config.eval_subset if config is not None else None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if bool(args.adapter) == bool(args.config or args.adapters):
        raise MergeError("give either --adapter DIR (a saved adapter) or a merge (--config/--adapters)")
    session = _session(args)
    bar = _ProgressBar("evaluate")
    try:
        if args.adapter:
            result = session.evaluate_saved(
                args.adapter, tasks=args.tasks, split=args.split or "test",
                subset=_subset(args, None), progress=bar,
            )
        else:
            config = _merge_config(args)
            merged = run_merge(config, task_registry=session.workspace.task_registry(),
                               artifacts_dir=session.root, save=True if args.save else None)
            result = session.evaluate_merge(
                merged.output, merge_tag=merged.merge_tag,
                tasks=args.tasks or config.eval_tasks, split=args.split or config.split,
                subset=_subset(args, config), run_dir=merged.run_dir, progress=bar,
            )
    finally:
        bar.close()
    print(json.dumps({
        "merge_tag": result.merge_tag,
        "objective_min_delta": result.objective,
        "metrics": result.metrics,
        "interference_delta": result.deltas,
        "results_file": str(result.results_file),
    }, indent=2))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from merging_core.evaluation.sweep import run_sweep

    config = _merge_config(args)
    search = config.search.model_dump(exclude_unset=True) if config.search else {}
    if args.search_type:
        search["type"] = args.search_type
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep:
            raise MergeError(f"--grid expects NAME=V1,V2,..., got {item!r}")
        search.setdefault("grid", {})[key] = [_value(v) for v in values.split(",")]
    if args.budget:
        search["budget"] = args.budget
    config = parse_merge_config({**config.model_dump(exclude_unset=True), "search": search},
                                args.config or "(command line)")
    session = _session(args)
    bar = _ProgressBar("sweep")
    try:
        result = run_sweep(config, session, progress=bar)
    finally:
        bar.close()
    best = result.best
    print(json.dumps({
        "sweep_id": result.sweep_id,
        "summary": str(result.summary_path),
        "plot": str(result.plot_path) if result.plot_path else None,
        "trials": len(result.trials),
        "resumed_trials": result.resumed_trials,
        "best": {"point": best.point, "objective": best.objective, "metrics": best.metrics},
    }, indent=2))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    described = [m.describe() for m in list_methods()]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    for method in described:
        print(f"{method['name']}: {method['doc']}")
        for param in method["params"]:
            default = "required" if param["required"] else f"default {param['default']!r}"
            print(f"    {param['name']} ({param['kind']}, {default}): {param['doc']}")
    return 0


def _merge_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="merge config YAML (the unified schema)")
    parser.add_argument("--adapters", nargs="+", help="task names or adapter directories")
    parser.add_argument("--method", help="merge method (see `lora-merge methods`)")
    parser.add_argument("--lambda", dest="lambda_", help="method_params.lambda: 0.5 or [0.3,0.7]")
    parser.add_argument("--param", action="append", default=[], help="method param NAME=VALUE")
    parser.add_argument("--merge-mode", choices=["common", "strict"])
    parser.add_argument("--save", action="store_true", help="save the merged adapter")
    parser.add_argument("--save-rank", type=int, help="rank of SVD-saved nonlinear merges")
    parser.add_argument("--workspace", help="workspace file (default: $LORA_MERGE_WORKSPACE or "
                        "workspaces/demo/workspace.yaml); also the task registry for task names")
    parser.add_argument("--output-dir", help="artifacts root (default: config output_dir or ./artifacts)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-merge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge adapters and write a run bundle")
    _merge_flags(merge)
    merge.set_defaults(handler=_cmd_merge)

    evaluate = commands.add_parser("evaluate", help="evaluate a merge (in memory) or a saved adapter")
    _merge_flags(evaluate)
    evaluate.add_argument("--adapter", help="a saved adapter directory (e.g. a run bundle)")
    evaluate.add_argument("--tasks", nargs="+", help="tasks to evaluate (default: the merged tasks)")
    evaluate.add_argument("--split", help="data split (default: the config's, else test)")
    evaluate.add_argument("--max-samples", type=int, help="evaluate on a stratified subset")
    evaluate.add_argument("--device", help="override the workspace device (cpu, cuda)")
    evaluate.set_defaults(handler=_cmd_evaluate)

    sweep = commands.add_parser("sweep", help="search merge coefficients (grid or bayes)")
    _merge_flags(sweep)
    sweep.add_argument("--search-type", choices=["grid", "bayes"], help="override search.type")
    sweep.add_argument("--grid", action="append", default=[], help="NAME=V1,V2,... grid values")
    sweep.add_argument("--budget", type=int, help="override search.budget")
    sweep.add_argument("--device", help="override the workspace device (cpu, cuda)")
    sweep.set_defaults(handler=_cmd_sweep)

    methods = commands.add_parser("methods", help="list merge methods and their parameters")
    methods.add_argument("--json", action="store_true")
    methods.set_defaults(handler=_cmd_methods)
    # Hooks for the service's CLI (app.cli), which adds `serve`, `db` and `--server`.
    parser.job_parsers = {"merge": merge, "evaluate": evaluate, "sweep": sweep}  # type: ignore[attr-defined]
    parser.commands = commands  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    release_freed_memory_promptly()
    with warnings.catch_warnings():
        warnings.simplefilter("default", DeprecationWarning)
        try:
            return int(args.handler(args))
        except MergeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
