"""`lora-merge`: the command-line interface (the seed's `main.py merge`).

    lora-merge merge --config configs/merge/merge_ties.yaml --save
    lora-merge merge --adapters intent sentiment --method weighted --lambda 0.7 --workspace ws.yaml
    lora-merge methods
"""

from __future__ import annotations

import argparse
import json
import logging
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
    registry = load_task_registry(args.workspace) if args.workspace else None
    result = run_merge(
        config,
        task_registry=registry,
        artifacts_dir=args.output_dir,
        save=True if args.save else None,
    )
    summary = {
        "merge_tag": result.merge_tag,
        "run_dir": str(result.run_dir),
        "adapter_path": str(result.adapter_path) if result.adapter_path else None,
        "num_modules": len(result.output.modules),
        "left_out": result.output.left_out,
    }
    print(json.dumps(summary, indent=2))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-merge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge adapters and write a run bundle")
    merge.add_argument("--config", help="merge config YAML (the unified schema)")
    merge.add_argument("--adapters", nargs="+", help="task names or adapter directories")
    merge.add_argument("--method", help="merge method (see `lora-merge methods`)")
    merge.add_argument("--lambda", dest="lambda_", help="method_params.lambda: 0.5 or [0.3,0.7]")
    merge.add_argument("--param", action="append", default=[], help="method param NAME=VALUE")
    merge.add_argument("--merge-mode", choices=["common", "strict"])
    merge.add_argument("--save", action="store_true", help="save the merged adapter")
    merge.add_argument("--save-rank", type=int, help="rank of SVD-saved nonlinear merges")
    merge.add_argument("--workspace", help="workspace/task registry YAML for task names")
    merge.add_argument("--output-dir", help="artifacts root (default: config output_dir or ./artifacts)")
    merge.set_defaults(handler=_cmd_merge)

    methods = commands.add_parser("methods", help="list merge methods and their parameters")
    methods.add_argument("--json", action="store_true")
    methods.set_defaults(handler=_cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("default", DeprecationWarning)
        try:
            return int(args.handler(args))
        except MergeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
