"""The Ray executor on a real local Ray cluster (2 CPUs), with two model actors: a grid sweep
runs on both and matches the embedded executor; a merge submitted during a sweep runs before
it ends; actors resolve the absolute paths the control plane sends; a killed actor is replaced
and its trial run again; a cancel reaches the running actors; a local Ray (`local`) starts and
stops with the service. The session cluster runs with token authentication (see `ray_helpers`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import Settings
from merging_core.runtime.index import read_index
from tests.ray_helpers import RayCluster
from tests.service_helpers import thread_server, wait_job

GRID = [i / 10 for i in range(8)]
SWEEP = {"adapters": ["topic", "mood"], "method": "weighted_delta",
         "search": {"type": "grid", "grid": {"lambda": GRID}}}
MERGE = {"adapters": ["topic", "mood"], "method": "ties", "eval_tasks": ["topic", "mood"],
         "save_merged": True}


def _ray(workspace: Path, artifacts: Path, cluster: RayCluster, **more: Any) -> Settings:
    return Settings(workspace=workspace, artifacts_dir=artifacts, executor="ray",
                    ray_address=cluster.address, ray_workers=2, worker_threads=1, **more)


def _wait_actors(app: Any, count: int = 2, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while sum(a["resident"] for a in app.state.service.executor.state.actors) < count:
        assert time.monotonic() < deadline, "the actors did not load their models"
        time.sleep(0.05)


def _wait_done(client: httpx.Client, job_id: str, at_least: int) -> None:
    deadline = time.monotonic() + 120
    while client.get(f"/jobs/{job_id}").json()["progress"]["done"] < at_least:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def _layout(artifacts: Path) -> set[str]:
    """The artifact tree's shape: relative paths with run and sweep ids and tags masked."""
    import re

    shape = set()
    for path in artifacts.rglob("*"):
        if path.is_dir() or path.name.startswith("merge_service.db"):
            continue
        relative = str(path.relative_to(artifacts))
        relative = re.sub(r"run_\d{8}_\d{6}(_\d+)?", "run_*", relative)
        relative = re.sub(r"_[0-9a-f]{8}(?=[_/.]|$)", "_<hash>", relative)
        shape.add(relative)
    return shape


def test_a_grid_sweep_runs_on_both_actors_and_matches_the_embedded_executor(
    tiny_workspace: Path, tmp_path: Path, ray_cluster: RayCluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The control plane runs here with a relative artifacts path; the actors run in the
    # cluster's own directory and must use the absolute paths the control plane resolves.
    monkeypatch.chdir(tmp_path)
    settings = _ray(tiny_workspace, Path("ray_artifacts"), ray_cluster)
    with thread_server(settings) as (client, app):
        _wait_actors(app)
        health = client.get("/healthz").json()
        assert health["executor"] == "ray" and health["ready"]
        assert [a["name"] for a in health["actors"]] == ["actor-0", "actor-1"]
        assert all(a["resident"] and a["device"] == "cpu" for a in health["actors"])
        infos = [slot.info for slot in app.state.service.executor.pool.slots]
        assert all(info["cwd"] != os.getcwd() for info in infos)
        assert {info["artifacts_dir"] for info in infos} == {str((tmp_path / "ray_artifacts").resolve())}

        sweep_id = client.post("/sweeps", json={**SWEEP, "method": "task_vector", "search": {
            "type": "grid", "grid": {"lambda": [i / 60 for i in range(60)]}}}).json()["id"]
        _wait_done(client, sweep_id, 2)
        # A merge submitted while the sweep runs starts once one trial ends, not after the sweep.
        merge = wait_job(client, client.post("/merges", json=MERGE).json()["id"])
        assert merge["status"] == "succeeded"
        assert client.get(f"/jobs/{sweep_id}").json()["status"] == "running"
        client.post(f"/jobs/{sweep_id}/cancel")
        assert wait_job(client, sweep_id)["status"] == "cancelled"

        job = wait_job(client, client.post("/sweeps", json=SWEEP).json()["id"])
        assert job["status"] == "succeeded", job
        ray_trials = client.get(f"/sweeps/{job['id']}/trials").json()["trials"]
    ray_root = tmp_path / "ray_artifacts"
    assert (ray_root / "merged/ties/mood_topic/runs").is_dir()  # written where the control plane said
    assert not (ray_cluster.cwd / "ray_artifacts").exists()
    assert [t["index"] for t in ray_trials] == list(range(len(GRID)))
    assert {t["worker"] for t in ray_trials} == {"actor-0", "actor-1"}  # each trial names its actor

    embedded = Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "embedded", worker_threads=1)
    with thread_server(embedded) as (client, _):
        client.post("/merges", json=MERGE)
        job = wait_job(client, client.post("/sweeps", json=SWEEP).json()["id"])
        assert job["status"] == "succeeded"
        local_trials = client.get(f"/sweeps/{job['id']}/trials").json()["trials"]
    assert [t["point"] for t in ray_trials] == [t["point"] for t in local_trials]  # index -> point
    for ours, theirs in zip(ray_trials, local_trials):
        assert ours["objective"] == pytest.approx(theirs["objective"], abs=1e-6)
        for task, value in theirs["metrics"].items():
            assert ours["metrics"][task] == pytest.approx(value, abs=1e-6)
    # The same files and index entries, whoever computed them.
    sweep_dir = "merged/weighted_delta/mood_topic"
    assert _layout(ray_root / sweep_dir) == _layout(tmp_path / "embedded" / sweep_dir)
    ray_index = read_index(ray_root / sweep_dir / "eval/index.json")
    local_index = read_index(tmp_path / "embedded" / sweep_dir / "eval/index.json")
    assert [sorted(e) for e in ray_index[-len(GRID):]] == [sorted(e) for e in local_index[-len(GRID):]]
    summary = json.loads(next((ray_root / sweep_dir / "sweeps").glob("sweep_*.json")).read_text())
    assert summary["complete"] and summary["num_trials"] == len(GRID)


def test_a_killed_actor_is_replaced_and_the_sweep_finishes(
    tiny_workspace: Path, tmp_path: Path, ray_cluster: RayCluster,
) -> None:
    import ray

    settings = _ray(tiny_workspace, tmp_path / "artifacts", ray_cluster)
    points = 40
    with thread_server(settings) as (client, app):
        _wait_actors(app)
        executor = app.state.service.executor
        job_id = client.post("/sweeps", json={**SWEEP, "search": {
            "type": "grid", "grid": {"lambda": [i / points for i in range(points)]}}}).json()["id"]
        _wait_done(client, job_id, 3)
        victim = executor.pool.slots[0]
        ray.kill(victim.handle, no_restart=True)  # mid-trial: both actors are busy
        job = wait_job(client, job_id, timeout=240)
        assert job["status"] == "succeeded", job
        assert executor.state.restarts >= 1 and executor.pool.slots[0] is not victim
        trials = client.get(f"/sweeps/{job_id}/trials").json()["trials"]
        assert [t["index"] for t in trials] == list(range(points))  # every trial once
        _wait_actors(app)
        assert client.get("/readyz").status_code == 200
    root = tmp_path / "artifacts/merged/weighted_delta/mood_topic"
    assert len(list(root.glob("sweeps/sweep_*/trials/trial_*.json"))) == points
    index = read_index(root / "eval/index.json")
    assert len({e["id"] for e in index}) == len(index) == points


def test_cancel_reaches_the_running_actors_and_restores_their_weights(
    tiny_workspace: Path, tmp_path: Path, ray_cluster: RayCluster,
) -> None:
    settings = _ray(tiny_workspace, tmp_path / "artifacts", ray_cluster)
    with thread_server(settings) as (client, app):
        _wait_actors(app)
        executor = app.state.service.executor
        before = [executor.inspect(i) for i in range(2)]
        # Whole-split trials, both actors busy all along: a cancel finds them mid-trial.
        job_id = client.post("/sweeps", json={**SWEEP, "search": {
            "type": "grid", "grid": {"lambda": [i / 400 for i in range(400)]}}}).json()["id"]
        _wait_done(client, job_id, 2)
        with client.stream("GET", f"/jobs/{job_id}/events") as stream:  # SSE under Ray
            lines = stream.iter_lines()
            assert any(line.startswith("event: progress") for line in lines)
        client.post(f"/jobs/{job_id}/cancel")
        final = wait_job(client, job_id)
        assert final["status"] == "cancelled"
        after = [executor.inspect(i) for i in range(2)]
        assert sum(a["cancels_received"] for a in after) >= 1  # the running trials were told to stop
        for old, new in zip(before, after):
            assert new["weights_sha256"] == old["weights_sha256"] and new["pristine"] and new["hooks"] == 0
        # the actors are free again: the next job runs
        assert wait_job(client, client.post("/merges", json=MERGE).json()["id"])["status"] == "succeeded"


def test_a_local_ray_starts_with_the_service_and_stops_with_it(tiny_workspace: Path, tmp_path: Path) -> None:
    """`LORA_MERGE_RAY_ADDRESS=local` (the default): the service starts a Ray of its own, runs a
    merge on its actor, and an interrupt (Ctrl-C) shuts it down cleanly with every Ray process
    it started gone (a local Ray's processes die with the thread that started them)."""
    import signal

    import psutil

    from tests.service_helpers import free_port, start_process_server, wait_ready

    port = free_port()
    (tmp_path / "artifacts").mkdir()
    server = start_process_server(tiny_workspace, tmp_path / "artifacts", port, env_more={
        "LORA_MERGE_EXECUTOR": "ray", "LORA_MERGE_RAY_ADDRESS": "local", "LORA_MERGE_WORKER_THREADS": "1",
        "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})  # disabled: no ~/.ray/auth_token
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            wait_ready(client)
            assert client.get("/readyz").json()["actors"][0]["resident"]
            assert wait_job(client, client.post("/merges", json=MERGE).json()["id"])["status"] == "succeeded"
        started = psutil.Process(server.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in started)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, f"Ray processes left behind: {[' '.join(p.cmdline())[:100] for p in alive]}"
    finally:
        if server.poll() is None:
            server.kill()
    log = (tmp_path / f"server-{port}.log").read_text()
    assert "Application shutdown complete" in log
