"""A third-party client generator reads the live document without a warning, and its client
works: openapi-python-client (pinned, in a venv of its own so that its dependencies never meet
ours) generates a client from a real uvicorn server's /openapi.json; that client, run in the
tool's venv (it needs httpx and attrs, which the tool brings), submits a merge and a sweep,
polls both to success, and downloads the sweep's plot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from filelock import FileLock

from app.settings import Settings
from tests.service_helpers import thread_server

GENERATOR_VERSION = "0.29.1"
# Created once in the user's cache, reused by later runs and other checkouts; a half-made one is
# made again.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
TOOL_VENV = CACHE / "lora-merge-tools" / f"openapi-python-client-{GENERATOR_VERSION}"
PACKAGE = "lora_merge_client"


def _tool_venv() -> Path:
    done = TOOL_VENV / ".installed"
    TOOL_VENV.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{TOOL_VENV}.lock"):
        if not done.is_file():
            shutil.rmtree(TOOL_VENV, ignore_errors=True)
            for command in ([sys.executable, "-m", "venv", TOOL_VENV],
                            [TOOL_VENV / "bin" / "python", "-m", "pip", "install", "--quiet",
                             "--disable-pip-version-check", f"openapi-python-client=={GENERATOR_VERSION}"]):
                made = subprocess.run(command, capture_output=True, text=True, timeout=600)
                assert made.returncode == 0, made.stdout + made.stderr
            done.touch()
    return TOOL_VENV


DRIVER = textwrap.dedent('''
    import json, sys, time

    from lora_merge_client import Client
    from lora_merge_client.api.jobs import create_merge, create_sweep, get_job
    from lora_merge_client.api.sweeps import get_sweep_plot
    from lora_merge_client.models import JobRead, JobStatus, MergeConfig

    client = Client(base_url=sys.argv[1], raise_on_unexpected_status=True, timeout=30)

    def follow(job):
        assert isinstance(job, JobRead), job
        deadline = time.monotonic() + 180
        while job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            assert time.monotonic() < deadline, job.status
            time.sleep(0.1)
            job = get_job.sync(job.id, client=client)
        return job

    merge = follow(create_merge.sync(client=client, body=MergeConfig.from_dict(
        {"adapters": ["topic", "mood"], "method": "ties", "save_merged": True})))
    sweep = follow(create_sweep.sync(client=client, body=MergeConfig.from_dict(
        {"adapters": ["topic", "mood"], "method": "weighted_delta", "eval_subset": {"max_samples": 12},
         "search": {"type": "grid", "grid": {"lambda": [0.3, 0.7]}}})))
    plot = get_sweep_plot.sync_detailed(sweep.id, client=client)
    print(json.dumps({
        "merge": merge.status.value, "run_id": merge.run_id, "sweep": sweep.status.value,
        "plot_status": int(plot.status_code), "plot_state": plot.headers.get("sweep-plot"),
        "png": plot.parsed.payload.read()[:4].hex(),
    }))
''')


def test_generated_client_has_no_warning_and_drives_the_service(
        tiny_workspace: Path, tmp_path: Path) -> None:
    tools = _tool_venv()
    env = {**os.environ, "PATH": f"{tools / 'bin'}{os.pathsep}{os.environ['PATH']}"}  # its ruff
    config = tmp_path / "generator.json"
    config.write_text(json.dumps({"project_name_override": "lora-merge-client",
                                  "package_name_override": PACKAGE}))
    settings = Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts")
    with thread_server(settings) as (client, _):
        base_url = str(client.base_url).rstrip("/")
        generated = subprocess.run(
            [tools / "bin" / "python", "-m", "openapi_python_client", "generate",
             "--url", f"{base_url}/openapi.json", "--config", config, "--meta", "none",
             "--output-path", tmp_path / PACKAGE],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        output = generated.stdout + generated.stderr
        assert generated.returncode == 0, output
        assert "warning" not in output.lower(), output  # e.g. an operation or a response left out

        driven = subprocess.run(
            [tools / "bin" / "python", "-c", DRIVER, base_url],
            cwd=tmp_path, env={**env, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
            timeout=400)
        assert driven.returncode == 0, driven.stdout + driven.stderr
    result = json.loads(driven.stdout.strip().splitlines()[-1])
    assert result["merge"] == result["sweep"] == "succeeded", result
    assert result["run_id"] and result["run_id"].startswith("run_"), result
    assert result["plot_status"] == 200 and result["plot_state"] == "complete", result
    assert result["png"] == b"\x89PNG".hex(), result
