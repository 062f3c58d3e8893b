"""A local Ray cluster for the tests: one head with 2 CPUs, no dashboard, a small object store.

Started with `ray start --head` from a directory of its own (so its actors run elsewhere than
the tests' control plane), on free ports, and stopped by killing exactly its own processes
(`ray stop` would stop every Ray on the machine). Teardown checks that none is left: a SIGKILL
in a kill-and-resume test can orphan them, and removes its folders.

The head runs with token authentication, its token in a file of its own (`RAY_AUTH_TOKEN_PATH`,
set for the test session too), as `ray start` does wherever a token exists: the service must
join such a head, and `~/.ray/auth_token` (which a local `ray.init()` writes) never decides how
the tests run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.service_helpers import free_port

OBJECT_STORE_BYTES = 200 * 1024 * 1024


@dataclass(frozen=True)
class RayCluster:
    address: str  # host:port of the head's GCS, what LORA_MERGE_RAY_ADDRESS takes
    temp_dir: Path
    cwd: Path
    token_file: Path  # its authentication token (RAY_AUTH_TOKEN_PATH)


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def cluster_processes(cluster: RayCluster) -> list[psutil.Process]:
    """Every process of this cluster: those that name its temp dir or port, and their children
    (the raylet's workers rename themselves `ray::...`)."""
    port = cluster.address.rsplit(":", 1)[1]
    marks = (str(cluster.temp_dir), f":{port}")
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
        except psutil.Error:
            continue
        if any(mark in cmdline for mark in marks) and process.pid != os.getpid():
            found[process.pid] = process
            try:
                for child in process.children(recursive=True):
                    found[child.pid] = child
            except psutil.Error:
                pass
    return list(found.values())


def stop_cluster(cluster: RayCluster, timeout: float = 3.0) -> list[str]:
    """Terminate the cluster's processes (then kill what is left); returns any survivors."""
    processes = cluster_processes(cluster)
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    time.sleep(0.5)
    survivors = []
    for process in cluster_processes(cluster):
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                survivors.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
        except psutil.Error:
            pass
    return survivors


@contextmanager
def ray_cluster(num_cpus: int = 2) -> Iterator[RayCluster]:
    """Start the head; while it runs, this process's `RAY_AUTH_TOKEN_PATH` names its token (and
    `RAY_AUTH_MODE` is unset), so servers started from here find it as a user's would."""
    # Ray's unix sockets live under the temp dir; their paths must stay under 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray_", dir="/tmp"))
    cwd = Path(tempfile.mkdtemp(prefix="ray_cwd_"))
    token_file = cwd / "auth_token"
    token_file.write_text(uuid.uuid4().hex)
    port = free_port()
    cluster = RayCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, cwd=cwd, token_file=token_file)
    command = [
        _ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false",
        f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
    ]
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    os.environ.pop("RAY_AUTH_MODE", None)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, timeout=120)
        yield cluster
    finally:
        survivors = stop_cluster(cluster)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if not survivors:
            shutil.rmtree(temp_dir, ignore_errors=True)
            shutil.rmtree(cwd, ignore_errors=True)
        assert not survivors, f"Ray processes left behind: {survivors}"
