"""`lora-merge`: the command-line interface (the seed's `main.py merge|merge-sweep|evaluate-merged`).

    lora-merge merge --config configs/merge/merge_ties.yaml --save
    lora-merge merge --adapters intent sentiment --method weighted --lambda 0.7 --workspace ws.yaml
    lora-merge evaluate --config configs/merge/merge_ties.yaml --workspace ws.yaml
    lora-merge evaluate --adapter artifacts/merged/ties/.../runs/run_... --workspace ws.yaml
    lora-merge sweep --config configs/merge/merge_weighted_delta_sweep_bayes.yaml --workspace ws.yaml
    lora-merge methods

The pieces are public so that the service's CLI (`app.cli`) builds the same commands:
`add_job_commands` adds them to a parser, `config_from_args` is the one place flags become a
`MergeConfig`, `ProgressBar` shows a job's progress and `run_command` runs a parsed command.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import yaml

from merging_core.adapters import load_task_registry
from merging_core.config import EvalSubsetConfig, MergeConfig, load_merge_config, parse_merge_config
from merging_core.engine import get_method, list_methods
from merging_core.engine.runner import run_merge
from merging_core.errors import MergeError
from merging_core.runtime.memory import release_freed_memory_promptly

if TYPE_CHECKING:
    from merging_core.evaluation.evaluate import EvalSession

log = logging.getLogger("lora-merge")

WORKSPACE_ENV = "LORA_MERGE_WORKSPACE"
ARTIFACTS_ENV = "LORA_MERGE_ARTIFACTS_DIR"


@dataclass(frozen=True)
class JobDefaults:
    """Where the local commands look when no flag, environment variable or config says.

    The workspace is `--workspace`, else `$LORA_MERGE_WORKSPACE`, else `workspace`. The artifacts
    root is `--output-dir`, else `$LORA_MERGE_ARTIFACTS_DIR`, else the config's `output_dir`,
    else `artifacts_dir`.
    """

    workspace: Path = Path("workspaces/demo/workspace.yaml")
    artifacts_dir: Path = Path("artifacts")


# --- flags -> config --------------------------------------------------------------------------


def _value(text: str) -> Any:
    """Parse a CLI value as YAML, so `0.5`, `[0.2, 0.8]` and `true` get their types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergeError(f"cannot parse {text!r}: {exc}") from None


def _pair(item: str, flag: str, form: str) -> tuple[str, str]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise MergeError(f"{flag} expects {form}, got {item!r}")
    return key, text


def config_from_args(args: argparse.Namespace) -> MergeConfig:
    """The merge config a job command's flags describe: the `--config` file, then the flags over it.

    Local commands and the service's `--server` mode both build their job from this, so a flag
    means the same thing either way. Flags a command does not define are simply absent.
    """
    source = args.config or "(command line)"
    if args.config:
        data = load_merge_config(args.config).model_dump(exclude_unset=True)
    elif not (args.adapters and args.method):
        raise MergeError("give --config, or both --adapters and --method")
    else:
        data = {}
    if args.adapters:
        data["adapters"] = args.adapters
    if args.method:
        data["method"] = args.method
    params = dict(data.get("method_params") or {})
    if args.lambda_ is not None:
        params["lambda"] = _value(args.lambda_)
    for item in args.param:
        key, text = _pair(item, "--param", "NAME=VALUE")
        params[key] = _value(text)
    if params:
        data["method_params"] = params
    if args.merge_mode:
        data["merge_mode"] = args.merge_mode
    if args.save_rank is not None:
        data["save_rank"] = args.save_rank
    if args.save:
        data["save_merged"] = True
    # Evaluation flags (evaluate, sweep).
    if getattr(args, "tasks", None):
        data["eval_tasks"] = args.tasks
    if getattr(args, "split", None):
        data["split"] = args.split
    if getattr(args, "max_samples", None) is not None:
        data["eval_subset"] = _subset_flags(args)
    # Sweep overrides (sweep).
    search_type = getattr(args, "search_type", None)
    grid = getattr(args, "grid", None) or []
    budget = getattr(args, "budget", None)
    if search_type or grid or budget is not None:
        search = dict(data.get("search") or {})
        if search_type:
            search["type"] = search_type
        for item in grid:
            key, values = _pair(item, "--grid", "NAME=V1,V2,...")
            # One YAML flow list, so per-adapter values work: lambda=[0.2,0.8],[0.5,0.5]
            search["grid"] = {**(search.get("grid") or {}), key: _value(f"[{values}]")}
        if budget is not None:
            search["budget"] = budget
        data["search"] = search
    return parse_merge_config(data, source)


def _subset_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """`--max-samples N`: a stratified subset of N examples per task."""
    if getattr(args, "max_samples", None) is None:
        return None
    return {"max_samples": args.max_samples, "stratified": True}


# --- progress ---------------------------------------------------------------------------------


class ProgressBar:
    """A job's progress: a tqdm bar on a terminal, log lines otherwise.

    Called as `bar(done, total, message, extra)`, the library's progress callback; `extra` may
    hold `best` (a sweep's best trial so far, with its `objective`).
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: Any = None

    def __call__(self, done: int, total: int, message: str,
                 extra: dict[str, Any] | None = None) -> None:
        best = (extra or {}).get("best")
        suffix = f" best={best['objective']:.4f}" if best else ""
        if not sys.stderr.isatty():
            log.info("%s %d/%d %s%s", self.description, done, total, message, suffix)
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
            self.bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


# --- local commands ---------------------------------------------------------------------------


def _workspace_path(args: argparse.Namespace, defaults: JobDefaults) -> Path:
    return Path(args.workspace or os.environ.get(WORKSPACE_ENV) or defaults.workspace)


def _artifacts_root(args: argparse.Namespace, defaults: JobDefaults,
                    config: MergeConfig | None) -> Path:
    output_dir = config.output_dir if config is not None else None
    return Path(args.output_dir or os.environ.get(ARTIFACTS_ENV) or output_dir
                or defaults.artifacts_dir)


def _session(args: argparse.Namespace, defaults: JobDefaults,
             config: MergeConfig | None) -> EvalSession:
    from merging_core.evaluation.evaluate import EvalSession
    from merging_core.evaluation.workspace import load_workspace

    workspace = load_workspace(_workspace_path(args, defaults))
    return EvalSession.from_workspace(workspace, _artifacts_root(args, defaults, config),
                                      device=getattr(args, "device", None))


def _cmd_merge(args: argparse.Namespace, *, defaults: JobDefaults) -> int:
    config = config_from_args(args)
    workspace = _workspace_path(args, defaults)
    explicit = args.workspace or os.environ.get(WORKSPACE_ENV)
    registry = load_task_registry(workspace) if explicit or workspace.is_file() else None
    # An optimizer (AdaMerging) or a method that reads activations (RegMean's Grams) needs the
    # resident model and the workspace's task data.
    needs_model = config.optimizer.name != "none" or get_method(config.method).needs_grams
    session = _session(args, defaults, config) if needs_model else None
    with ProgressBar(config.optimizer.name if config.optimizer.name != "none" else config.method) as bar:
        result = run_merge(config, task_registry=registry,
                           artifacts_dir=_artifacts_root(args, defaults, config),
                           session=session, progress=bar)
    print(json.dumps({
        "merge_tag": result.merge_tag,
        "run_dir": str(result.run_dir),
        "adapter_path": str(result.adapter_path) if result.adapter_path else None,
        "num_modules": len(result.output.modules),
        "left_out": result.output.left_out,
    }, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace, *, defaults: JobDefaults) -> int:
    if bool(args.adapter) == bool(args.config or args.adapters):
        raise MergeError("give either --adapter DIR (a saved adapter) or a merge (--config/--adapters)")
    with ProgressBar("evaluate") as bar:
        if args.adapter:
            session = _session(args, defaults, None)
            subset = _subset_flags(args)
            result = session.evaluate_saved(
                args.adapter, tasks=args.tasks, split=args.split or "test",
                subset=EvalSubsetConfig(**subset) if subset else None, progress=bar,
            )
        else:
            config = config_from_args(args)
            session = _session(args, defaults, config)
            merged = run_merge(config, task_registry=session.workspace.task_registry(),
                               artifacts_dir=session.root, session=session, progress=bar)
            result = session.evaluate_merge(
                merged.output, merge_tag=merged.merge_tag, tasks=config.eval_tasks,
                split=config.split, subset=config.eval_subset, run_dir=merged.run_dir,
                progress=bar,
            )
    print(json.dumps({
        "merge_tag": result.merge_tag,
        "objective_min_delta": result.objective,
        "metrics": result.metrics,
        "interference_delta": result.deltas,
        "results_file": str(result.results_file),
    }, indent=2))
    return 0


def _cmd_sweep(args: argparse.Namespace, *, defaults: JobDefaults) -> int:
    from merging_core.search import run_sweep

    config = config_from_args(args)
    session = _session(args, defaults, config)
    with ProgressBar("sweep") as bar:
        result = run_sweep(config, session, progress=bar)
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


# --- parsers ----------------------------------------------------------------------------------


def _merge_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="merge config YAML (the unified schema)")
    parser.add_argument("--adapters", nargs="+", help="task names or adapter directories")
    parser.add_argument("--method", help="merge method (see `lora-merge methods`)")
    parser.add_argument("--lambda", dest="lambda_", metavar="LAMBDA",
                        help="method_params.lambda: 0.5 or [0.3,0.7]")
    parser.add_argument("--param", action="append", default=[], help="method param NAME=VALUE")
    parser.add_argument("--merge-mode", choices=["common", "strict"])
    parser.add_argument("--save", action="store_true", help="save the merged adapter (save_merged)")
    parser.add_argument("--save-rank", type=int, help="rank of SVD-saved nonlinear merges")
    parser.add_argument("--workspace", help=f"workspace file (default: ${WORKSPACE_ENV} or the "
                        "demo workspace); also the task registry for task names")
    parser.add_argument("--output-dir", help=f"artifacts root (default: ${ARTIFACTS_ENV}, else the "
                        "config's output_dir, else ./artifacts)")


def _eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+",
                        help="tasks to evaluate (eval_tasks; default: the merged tasks)")
    parser.add_argument("--split", help="data split (default: the config's, else test)")
    parser.add_argument("--max-samples", type=int, help="evaluate on a stratified subset (eval_subset)")
    parser.add_argument("--device", help="override the workspace device (cpu, cuda)")


JobHandler = Callable[..., int]


def add_job_commands(
    subparsers: Any, *, defaults: JobDefaults | None = None,
) -> dict[str, argparse.ArgumentParser]:
    """Add `merge`, `evaluate`, `sweep` and `methods` to `subparsers` (from `add_subparsers`).

    Returns the three job parsers by canonical name. The seed's names are aliases
    (`evaluate-merged`, `merge-sweep`); `args.command` is always the canonical name.
    """
    defaults = defaults or JobDefaults()
    jobs: dict[str, argparse.ArgumentParser] = {}
    commands: list[tuple[str, list[str], str, JobHandler]] = [
        ("merge", [], "merge adapters and write a run bundle", _cmd_merge),
        ("evaluate", ["evaluate-merged"], "evaluate a merge (in memory) or a saved adapter",
         _cmd_evaluate),
        ("sweep", ["merge-sweep"], "search merge coefficients (grid or bayes)", _cmd_sweep),
    ]
    for name, aliases, help_text, handler in commands:
        parser = subparsers.add_parser(name, aliases=aliases, help=help_text)
        _merge_flags(parser)
        parser.set_defaults(command=name, handler=functools.partial(handler, defaults=defaults))
        jobs[name] = parser
    jobs["evaluate"].add_argument("--adapter", help="a saved adapter directory (e.g. a run bundle)")
    _eval_flags(jobs["evaluate"])
    _eval_flags(jobs["sweep"])
    jobs["sweep"].add_argument("--search-type", choices=["grid", "bayes"], help="override search.type")
    jobs["sweep"].add_argument("--grid", action="append", default=[],
                               help="search.grid values NAME=V1,V2,... (values parse as YAML)")
    jobs["sweep"].add_argument("--budget", type=int, help="override search.budget")

    methods = subparsers.add_parser("methods", help="list merge methods and their parameters")
    methods.add_argument("--json", action="store_true")
    methods.set_defaults(handler=_cmd_methods)
    return jobs


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command's handler; bad input (MergeError) prints `error: ...` and gives 2."""
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    release_freed_memory_promptly()
    with warnings.catch_warnings():
        warnings.simplefilter("default", DeprecationWarning)
        try:
            return int(args.handler(args))
        except MergeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2


def build_parser(defaults: JobDefaults | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-merge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    add_job_commands(parser.add_subparsers(dest="command", required=True), defaults=defaults)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
