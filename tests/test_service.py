"""End-to-end: a real uvicorn server on a loopback port, driven with httpx."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from merging_core.evaluation.holder import ModelHolder
from merging_core.runtime.index import read_index
from tests.service_helpers import free_port, start_process_server, thread_server, wait_job, wait_ready

MERGE = {"adapters": ["topic", "mood"], "method": "ties", "eval_tasks": ["topic", "mood"],
         "save_merged": True}
SWEEP = {"adapters": ["topic", "mood"], "method": "weighted_delta",
         "eval_subset": {"max_samples": 12},
         "search": {"type": "grid", "grid": {"lambda": [0.2, 0.5, 0.8]}}}


@pytest.fixture
def settings(tiny_workspace: Path, tmp_path: Path) -> Settings:
    return Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts")


@pytest.fixture
def any_executor(tiny_workspace: Path, tmp_path: Path, executor_settings: dict[str, object]) -> Settings:
    """The same service under each executor: the embedded worker, and two Ray actors."""
    return Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts", **executor_settings)


def test_merge_evaluation_and_sweep_end_to_end(any_executor: Settings) -> None:
    settings = any_executor
    ray = settings.executor == "ray"
    loads_before = ModelHolder.load_count
    with thread_server(settings) as (client, app):
        # The model is resident in the worker process (each actor), loaded once; the API
        # process loads none.
        assert app.state.service.executor.state.info["model_loads"] == 1
        assert app.state.service.executor.state.info["pid"] != os.getpid()
        merge = client.post("/merges", json=MERGE)
        assert merge.status_code == 202 and merge.headers["location"] == f"/jobs/{merge.json()['id']}"
        evaluation = client.post("/evaluations", json={**MERGE, "method": "uniform", "save_merged": False})
        sweep = client.post("/sweeps", json=SWEEP)
        jobs = {name: wait_job(client, r.json()["id"]) for name, r in
                (("merge", merge), ("evaluation", evaluation), ("sweep", sweep))}
        assert {name: j["status"] for name, j in jobs.items()} == dict.fromkeys(jobs, "succeeded")
        for job in jobs.values():
            assert job["timestamps"]["started_at"] and job["timestamps"]["finished_at"]
            # UTC with its offset, as in the 202 answer (SQLite itself keeps none)
            assert all(t.endswith("Z") for t in job["timestamps"].values()), job["timestamps"]
        assert merge.json()["timestamps"]["created_at"] == jobs["merge"]["timestamps"]["created_at"]

        artifacts = settings.artifacts_dir
        merge_result = jobs["merge"]["result"]
        run_dir = Path(merge_result["run_dir"])
        assert jobs["merge"]["run_id"] == run_dir.name  # what the OpenAPI links to GET /runs follow
        assert run_dir.parent == artifacts / "merged" / "ties" / "mood_topic" / "runs"
        for name in ("merge_metadata.json", "summary.json", "adapter_model.safetensors",
                     "adapter_config.json", "eval_results_test.json"):
            assert (run_dir / name).is_file(), name
        tag = merge_result["merge_tag"]
        assert (artifacts / "merged/ties/mood_topic/eval/test" / f"eval_results_{tag}_test.json").is_file()
        assert (artifacts / "topic/metrics/eval/test/merged/mood" / tag / "metrics.json").is_symlink()

        run = client.get(f"/runs/{run_dir.name}").json()
        assert run["metadata"]["merge_tag"] == tag and run["adapter_url"]
        download = client.get(run["adapter_url"])
        assert download.status_code == 200 and download.content[:2] == b"PK"

        trials = client.get(f"/sweeps/{jobs['sweep']['id']}/trials").json()
        assert [t["index"] for t in trials["trials"]] == [0, 1, 2]
        # each trial says what it was scored at (the 12-example subset) and who ran it
        assert {t["fidelity"] for t in trials["trials"]} == {12}
        workers = {t["worker"] for t in trials["trials"]}
        assert workers <= {"actor-0", "actor-1"} if ray else workers == {None}
        plot = client.get(f"/sweeps/{jobs['sweep']['id']}/plot.png")
        assert plot.content[:4] == b"\x89PNG" and plot.headers["sweep-plot"] == "complete"
        octets = client.get(f"/sweeps/{jobs['sweep']['id']}/plot.png",
                            headers={"Accept": "application/octet-stream"})
        assert octets.headers["content-type"] == "application/octet-stream"
        assert octets.content == plot.content

        on_disk = {}
        for index in artifacts.glob("merged/*/*/eval/index.json"):
            on_disk.update({e["id"]: e for e in read_index(index)})
        mirrored = client.get("/evaluations", params={"limit": 500}).json()
        assert mirrored["total"] == len(on_disk) == 5  # merge + evaluation + 3 trials
        for item in mirrored["items"]:
            assert item["metrics"] == on_disk[item["id"]]["metrics"]
            assert item["objective_min_delta"] == on_disk[item["id"]]["objective_min_delta"]
        by_topic = client.get("/evaluations", params={"task": "topic", "sort": "metric"}).json()
        assert by_topic["total"] == 5
        tasks = {t["name"]: t for t in client.get("/tasks").json()}
        assert "test" in tasks["topic"]["reference"]
        methods = {m["name"]: m for m in client.get("/methods").json()}
        assert methods["ties"]["params_defaults"] == {"k": 20.0, "lambda": 1.0}
        listed = client.get("/jobs", params={"kind": "sweep", "limit": 1}).json()
        assert [j["id"] for j in listed["jobs"]] == [jobs["sweep"]["id"]]
    assert ModelHolder.load_count == loads_before


def _model_state(executor: object) -> dict[str, object]:
    state = executor.inspect()  # type: ignore[attr-defined]
    return {k: state[k] for k in ("weights_sha256", "pristine", "requires_grad", "hooks")}


def test_cancel_a_running_sweep_restores_weights_and_events_stream(any_executor: Settings) -> None:
    # One actor under Ray, so that a second job waits in the queue as it does embedded.
    settings = any_executor.model_copy(update={"ray_workers": 1})
    slow = {**SWEEP, "eval_subset": None,
            "search": {"type": "grid", "grid": {"lambda": [i / 20 for i in range(20)]}}}
    with thread_server(settings) as (client, app):
        worker = app.state.service.executor
        before = _model_state(worker)
        job_id = client.post("/sweeps", json=slow).json()["id"]
        wait_job(client, job_id, until={"running"})
        while client.get(f"/jobs/{job_id}").json()["progress"]["done"] < 1:
            time.sleep(0.05)
        # The running sweep's plot is drawn from its trials so far, and says so.
        plot = client.get(f"/sweeps/{job_id}/plot.png")
        assert plot.status_code == 200 and plot.content[:4] == b"\x89PNG"
        assert plot.headers["sweep-plot"] == "partial" and int(plot.headers["sweep-trials"]) >= 1
        cancelled = client.post(f"/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"]
        done_at_cancel = cancelled.json()["progress"]["done"]
        final = wait_job(client, job_id)
        assert final["status"] == "cancelled"
        assert final["progress"]["done"] <= done_at_cancel + 1  # stopped at the next trial
        after = _model_state(worker)  # across the process boundary: weights restored bit for bit
        assert after == before and after["pristine"] and after["hooks"] == 0
        with client.stream("GET", f"/jobs/{job_id}/events") as events:
            body = "".join(events.iter_text())
        assert "event: status" in body and "cancelled" in body and "event: end" in body
        assert client.post(f"/jobs/{job_id}/cancel").status_code == 409
        assert client.get(f"/sweeps/{job_id}/plot.png").headers["sweep-plot"] == "partial"
        # A queued job (behind a running sweep) is cancelled at once and never runs.
        blocker = client.post("/sweeps", json={**slow, "search": {
            "type": "grid", "grid": {"lambda": [i / 40 for i in range(40)]}}}).json()["id"]
        wait_job(client, blocker, until={"running"})
        queued = client.post("/merges", json=MERGE).json()["id"]
        answer = client.post(f"/jobs/{queued}/cancel").json()
        assert answer["status"] == "cancelled" and answer["timestamps"]["started_at"] is None
        # A sweep with no trial yet: 409 with Retry-After; one that ended without any: 404.
        waiting = client.post("/sweeps", json=SWEEP).json()["id"]
        early = client.get(f"/sweeps/{waiting}/plot.png")
        assert early.status_code == 409 and int(early.headers["retry-after"]) >= 1
        assert early.headers["content-type"].startswith("application/problem+json")
        client.post(f"/jobs/{waiting}/cancel")
        assert client.get(f"/sweeps/{waiting}/plot.png").status_code == 404
        client.post(f"/jobs/{blocker}/cancel")
        assert wait_job(client, blocker)["status"] == "cancelled"
        assert client.get(f"/jobs/{queued}").json()["timestamps"]["started_at"] is None


def test_idempotency_key(settings: Settings) -> None:
    with thread_server(settings) as (client, _):
        first = client.post("/merges", json=MERGE, headers={"Idempotency-Key": "abc"})
        again = client.post("/merges", json=MERGE, headers={"Idempotency-Key": "abc"})
        # A replay answers like the first call, marked as a replay.
        assert first.status_code == again.status_code == 202
        assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"
        assert first.json()["id"] == again.json()["id"]
        other = client.post("/merges", json={**MERGE, "method": "uniform"}, headers={"Idempotency-Key": "abc"})
        assert other.status_code == 422 and "different request" in other.json()["detail"]
        wait_job(client, first.json()["id"])

        # Concurrent first uses of one key: one job, the others get it back (no 500).
        body = {**MERGE, "method": "uniform"}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: client.post("/merges", json=body,
                                                          headers={"Idempotency-Key": "race"}), range(6)))
        assert [a.status_code for a in answers] == [202] * 6, [a.text for a in answers]
        assert sum("idempotent-replayed" in a.headers for a in answers) == 5
        assert len({a.json()["id"] for a in answers}) == 1
        wait_job(client, answers[0].json()["id"])


def test_killed_server_resumes_its_sweep(tiny_workspace: Path, tmp_path: Path,
                                        executor_settings: dict[str, object]) -> None:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    port = free_port()
    sweep = {**SWEEP, "eval_subset": None,
             "search": {"type": "grid", "grid": {"lambda": [i / 40 for i in range(40)]}}}
    env = {f"LORA_MERGE_{name.upper()}": str(value) for name, value in executor_settings.items()}
    process = start_process_server(tiny_workspace, artifacts, port, env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_ready(client)
        job_id = client.post("/sweeps", json=sweep).json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/jobs/{job_id}").json()["progress"]["done"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        time.sleep(0.5)  # its worker process (its actors) sees the service gone and exits at once
        trials_dir = next(artifacts.glob("merged/weighted_delta/mood_topic/sweeps/sweep_*/trials"))
        before_restart = {p.name: p.read_bytes() for p in trials_dir.glob("trial_*.json")}
        assert 3 <= len(before_restart) < 40

        process = start_process_server(tiny_workspace, artifacts, port, env)
        wait_ready(client)
        job = wait_job(client, job_id)
        assert job["status"] == "succeeded" and job["attempts"] == 2
        assert job["result"]["resumed_trials"] == len(before_restart)
        after = {p.name: p.read_bytes() for p in trials_dir.glob("trial_*.json")}
        assert len(after) == 40
        assert all(after[name] == content for name, content in before_restart.items())
        index = read_index(artifacts / "merged/weighted_delta/mood_topic/eval/index.json")
        ids = [e["id"] for e in index]
        assert len(ids) == len(set(ids)) == 40
        trials = client.get(f"/sweeps/{job_id}/trials").json()["trials"]
        assert [t["index"] for t in trials] == list(range(40))
        mirrored = client.get("/evaluations", params={"limit": 500}).json()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        client.close()
    from app.cli import main

    env = {"LORA_MERGE_WORKSPACE": str(tiny_workspace), "LORA_MERGE_ARTIFACTS_DIR": str(artifacts)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from app.settings import get_settings

    get_settings.cache_clear()
    try:
        assert main(["db", "reindex"]) == 0
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
    from app.db import EvalEntry, make_engine, make_session_factory
    from sqlalchemy import select

    engine = make_engine(f"sqlite:///{(artifacts / 'merge_service.db').resolve()}")
    with make_session_factory(engine)() as session:
        reindexed = {e.id: e.entry for e in session.scalars(select(EvalEntry))}
    engine.dispose()
    assert set(reindexed) == {item["id"] for item in mirrored["items"]}
    assert json.dumps(reindexed, sort_keys=True) == json.dumps(
        {e["id"]: e for e in index}, sort_keys=True)
