"""`lora-merge`: the library's CLI plus the service commands.

    lora-merge serve                     start the service (uvicorn) on the configured workspace
    lora-merge db upgrade | reindex      migrate the database; rebuild the eval mirror from disk
    lora-merge merge|evaluate|sweep --server http://127.0.0.1:8000 ...
                                         submit to a running service and follow the job
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from app.settings import Settings
from merging_core.cli import JobDefaults, ProgressBar, add_job_commands, config_from_args, run_command
from merging_core.errors import MergeError

TERMINAL = {"succeeded", "failed", "cancelled"}
ENDPOINTS = {"merge": "/merges", "evaluate": "/evaluations", "sweep": "/sweeps"}


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    overrides = {k: v for k, v in {"host": args.host, "port": args.port,
                                   "workspace": args.workspace,
                                   "artifacts_dir": args.artifacts_dir}.items() if v is not None}
    settings = Settings(**overrides)
    settings.workspace_file()  # a missing workspace is a one-line error here, not a failed start-up
    # This process plans requests (small tensor checks on adapters) in many threads; the model
    # and its compute live in the worker process, which sets its own torch threads.
    import torch

    torch.set_num_threads(1)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


def _cmd_db(args: argparse.Namespace) -> int:
    from app import crud
    from app.db import make_engine, make_session_factory
    from app.db import upgrade_database

    settings = Settings()
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)  # the default database lives there
    upgrade_database(settings.resolved_database_url)
    if args.action == "upgrade":
        print(f"database at head: {settings.resolved_database_url}")
        return 0
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        count = crud.reindex(session, artifacts_dir=settings.artifacts_dir)
    engine.dispose()
    print(json.dumps({"reindexed_entries": count, "artifacts_dir": str(settings.artifacts_dir)}))
    return 0


def _remote(args: argparse.Namespace) -> int:
    """Submit the job to a running service, follow it with a progress bar, print the result."""
    import httpx

    if getattr(args, "adapter", None):
        raise MergeError("--server evaluates merges; evaluate a saved adapter (--adapter) locally")
    body = config_from_args(args).model_dump(mode="json", exclude_unset=True)
    token = os.environ.get("LORA_MERGE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=args.server, headers=headers, timeout=30) as client:
        response = client.post(ENDPOINTS[args.command], json=body)
        if response.status_code >= 400:
            problem = _json(response)
            print(f"error: {response.status_code} {problem.get('detail', response.text)}", file=sys.stderr)
            return 2
        job = response.json()
        with ProgressBar(args.command) as bar:
            while job["status"] not in TERMINAL:
                time.sleep(0.5)
                job = client.get(f"/jobs/{job['id']}").json()
                progress = job["progress"]
                bar(progress["done"], max(progress["total"], 1), progress["message"],
                    {"best": progress.get("best")} if progress.get("best") else {})
    print(json.dumps({"id": job["id"], "status": job["status"], "result": job["result"],
                      "error": job["error"]}, indent=2))
    return 0 if job["status"] == "succeeded" else 1


def _json(response: Any) -> dict[str, Any]:
    try:
        return dict(response.json())
    except ValueError:
        return {}


def build_parser() -> argparse.ArgumentParser:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="lora-merge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)
    # Local jobs find the service's workspace and artifacts, from whatever directory.
    defaults = JobDefaults(workspace=settings.workspace, artifacts_dir=settings.artifacts_dir)
    for job in add_job_commands(commands, defaults=defaults).values():
        job.add_argument("--server", help="submit to a running service at this URL instead "
                         "(token from $LORA_MERGE_TOKEN)")
    serve = commands.add_parser("serve", help="start the HTTP service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workspace", help="workspace file (default: $LORA_MERGE_WORKSPACE or the demo)")
    serve.add_argument("--artifacts-dir")
    serve.set_defaults(handler=_cmd_serve)
    database = commands.add_parser("db", help="database maintenance")
    database.add_argument("action", choices=["upgrade", "reindex"])
    database.set_defaults(handler=_cmd_db)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "server", None):
        args.handler = _remote  # the same job, run by the service
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
