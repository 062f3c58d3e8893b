"""Helpers to run the real service (uvicorn) on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(client: httpx.Client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("service not ready")


def wait_job(client: httpx.Client, job_id: str, timeout: float = 180,
             until: set[str] = TERMINAL) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {job['status']}")


@contextmanager
def thread_server(settings: Any) -> Iterator[tuple[httpx.Client, Any]]:
    """uvicorn in a thread of this process (so tests can look at the runtime)."""
    import uvicorn

    from app.main import create_app

    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_ready(client)
        yield client, app
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=10)


def start_process_server(workspace: Path, artifacts: Path, port: int,
                         env_more: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LORA_MERGE_WORKSPACE": str(workspace),
           "LORA_MERGE_ARTIFACTS_DIR": str(artifacts), "HF_HUB_OFFLINE": "1", **(env_more or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env,
        stdout=subprocess.DEVNULL, stderr=open(artifacts.parent / f"server-{port}.log", "ab"),
    )
