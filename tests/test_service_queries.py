"""The service's query side: `GET /evaluations` filters, sorts and paging; `GET /jobs` pages;
readiness; and the CLI's `--server` mode and `db upgrade`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from merging_core.runtime.index import read_index
from tests.service_helpers import thread_server, wait_job

PAIR = ["topic", "mood"]


@pytest.fixture
def settings(tiny_workspace: Path, tmp_path: Path) -> Settings:
    return Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts")


def _on_disk(artifacts: Path) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for index in artifacts.glob("merged/*/*/eval/index.json"):
        for entry in read_index(index):
            assert entry["id"] not in entries
            entries[entry["id"]] = entry
    return entries


class _Desc:
    """A sort key that orders descending while `sorted` stays stable (ties keep id order)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Desc) -> bool:
        return bool(self.value > other.value)


def _ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["items"]]


# --- GET /evaluations ------------------------------------------------------------------------


def test_evaluations_filters_sorts_and_pages(settings: Settings) -> None:
    sweep = {"adapters": PAIR, "method": "weighted_delta", "eval_subset": {"max_samples": 12},
             "search": {"type": "grid", "grid": {"lambda": [0.2, 0.5, 0.8]}}}
    merge = {"adapters": PAIR, "method": "ties", "eval_tasks": PAIR}
    # Another method, another split, and only one of the two tasks.
    evaluation = {"adapters": PAIR, "method": "uniform", "eval_tasks": ["topic"], "split": "train"}
    with thread_server(settings) as (client, _):
        posted = [client.post("/sweeps", json=sweep), client.post("/merges", json=merge),
                  client.post("/evaluations", json=evaluation)]
        assert [r.status_code for r in posted] == [202] * 3, [r.text for r in posted]
        jobs = [wait_job(client, r.json()["id"]) for r in posted]
        assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs

        disk = _on_disk(settings.artifacts_dir)
        assert len(disk) == 5  # 3 trials + the merge + the evaluation

        def query(**params: Any) -> dict[str, Any]:
            response = client.get("/evaluations", params={"limit": 500, **params})
            assert response.status_code == 200, response.text
            page = response.json()
            assert page["total"] == len(page["items"])
            return page

        everything = query()
        assert sorted(_ids(everything)) == sorted(disk)
        for item in everything["items"]:  # the mirror says what the index files say
            entry = disk[item["id"]]
            for key, value in item.items():
                assert value == entry.get(key, {} if key == "params" else None), (key, item["id"])

        # Each filter returns exactly the entries of the index files that match it.
        def expect(predicate: Any) -> list[str]:
            return sorted(i for i, e in disk.items() if predicate(e))

        sweep_ids = expect(lambda e: e["method"] == "weighted_delta")
        assert len(sweep_ids) == 3
        assert {disk[i]["sweep_id"] for i in sweep_ids} == {jobs[0]["sweep_id"]}
        namespace = disk[sweep_ids[0]]["subset"]
        assert namespace and namespace.startswith("subset_n12_")
        merge_tag = jobs[1]["result"]["merge_tag"]
        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"method": "weighted_delta"}, sweep_ids),
            ({"method": "ties"}, expect(lambda e: e["method"] == "ties")),
            ({"method": "uniform"}, expect(lambda e: e["method"] == "uniform")),
            ({"method": "no_such_method"}, []),
            ({"task": "topic"}, sorted(disk)),
            ({"task": "mood"}, expect(lambda e: "mood" in e["metrics"])),
            ({"task": "no_such_task"}, []),
            ({"split": "test"}, expect(lambda e: e["split"] == "test")),
            ({"split": "train"}, expect(lambda e: e["split"] == "train")),
            ({"tag": merge_tag}, expect(lambda e: e["merge_tag"] == merge_tag)),
            ({"tag": disk[sweep_ids[1]]["merge_tag"]}, [sweep_ids[1]]),
            ({"subset": namespace}, sweep_ids),
            ({"subset": ""}, expect(lambda e: e["subset"] is None)),
            ({"method": "weighted_delta", "task": "mood", "split": "test", "subset": namespace},
             sweep_ids),
            ({"method": "uniform", "task": "mood"}, []),
        ]
        for params, expected in cases:
            assert sorted(_ids(query(**params))) == expected, params
        assert len(expect(lambda e: "mood" in e["metrics"])) == 4
        assert len(expect(lambda e: e["split"] == "train")) == 1
        assert len(expect(lambda e: e["subset"] is None)) == 2
        assert expect(lambda e: e["merge_tag"] == merge_tag) == [
            i for i, e in disk.items() if e["run_id"] == jobs[1]["result"]["run_id"]]

        # Sorts: by the entry's objective, or by one task's metric or interference delta; ties
        # are broken by id (ascending) in both directions.
        def ordered(key: Any, task: str | None, descending: bool) -> list[str]:
            chosen = [e for e in disk.values() if task is None or task in e["metrics"]]
            by_id = sorted(chosen, key=lambda e: e["id"])
            if descending:  # stable sorts: the id order survives among equal keys
                return [e["id"] for e in sorted(by_id, key=lambda e: _Desc(key(e)))]
            return [e["id"] for e in sorted(by_id, key=key)]

        for order in ("asc", "desc"):
            descending = order == "desc"
            got = query(sort="objective", order=order)
            assert _ids(got) == ordered(lambda e: e["objective_min_delta"], None, descending)
            values = [item["objective_min_delta"] for item in got["items"]]
            assert values == sorted(values, reverse=descending)
            for task in PAIR:
                got = query(sort="metric", task=task, order=order)
                assert _ids(got) == ordered(lambda e: e["metrics"][task], task, descending)
                values = [item["metrics"][task] for item in got["items"]]
                assert values == sorted(values, reverse=descending)
                got = query(sort="interference", task=task, order=order)
                assert _ids(got) == ordered(lambda e: e["interference_delta"][task], task, descending)
            got = query(sort="created_at", order=order)
            assert _ids(got) == ordered(lambda e: e["created_at"], None, descending)
        # The default is newest first.
        assert _ids(query()) == ordered(lambda e: e["created_at"], None, True)
        # The values actually differ between entries, so the orders above say something.
        assert len({e["metrics"]["topic"] for e in disk.values()}) > 1
        assert len({e["objective_min_delta"] for e in disk.values()}) > 1

        for sort in ("metric", "interference"):  # "the metric of which task?"
            refused = client.get("/evaluations", params={"sort": sort})
            assert refused.status_code == 422 and "task" in refused.json()["detail"], refused.text

        # limit + offset: every entry exactly once, in the unpaged order, total on each page.
        for params in ({}, {"sort": "objective", "order": "asc"},
                       {"sort": "metric", "task": "mood", "order": "desc"}):
            full = _ids(query(**params))
            walked: list[str] = []
            for offset in range(0, len(full) + 2, 2):
                page = client.get("/evaluations",
                                  params={**params, "limit": 2, "offset": offset}).json()
                assert page["total"] == len(full)
                assert len(page["items"]) == min(2, max(0, len(full) - offset))
                walked += _ids(page)
            assert walked == full, params
        for bad in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"sort": "nope"},
                    {"order": "sideways"}):
            assert client.get("/evaluations", params=bad).status_code == 422, bad


# --- GET /jobs pagination --------------------------------------------------------------------


def test_jobs_pagination_and_filters(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    with thread_server(settings) as (client, app):
        # Hold the worker so that every job stays queued until we let it go.
        paused = app.state.service.executor.paused()
        paused.__enter__()
        bodies = [
            ("/merges", "merge", {"adapters": PAIR, "method": "ties"}),
            ("/evaluations", "evaluate", {"adapters": PAIR, "method": "uniform",
                                          "eval_subset": {"max_samples": 8}}),
            ("/sweeps", "sweep", {"adapters": PAIR, "method": "weighted_delta",
                                  "eval_subset": {"max_samples": 8},
                                  "search": {"type": "grid", "grid": {"lambda": [0.5]}}}),
            ("/merges", "merge", {"adapters": PAIR, "method": "uniform"}),
            ("/evaluations", "evaluate", {"adapters": PAIR, "method": "ties",
                                          "eval_subset": {"max_samples": 8}}),
            ("/sweeps", "sweep", {"adapters": PAIR, "method": "weighted_delta",
                                  "eval_subset": {"max_samples": 8},
                                  "search": {"type": "grid", "grid": {"lambda": [0.3]}}}),
            ("/merges", "merge", {"adapters": PAIR, "method": "weighted", "method_params": {"lambda": 0.4}}),
        ]
        submitted: list[tuple[str, str]] = []  # (id, kind) in submission order
        try:
            for route, kind, body in bodies:
                response = client.post(route, json=body)
                assert response.status_code == 202, response.text
                submitted.append((response.json()["id"], kind))
            cancelled = {submitted[3][0], submitted[5][0]}
            for job_id in cancelled:
                assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"

            def walk(limit: int, **params: Any) -> list[dict[str, Any]]:
                seen: list[dict[str, Any]] = []
                token = None
                for _ in range(20):
                    query = {"limit": limit, **params, **({"page_token": token} if token else {})}
                    response = client.get("/jobs", params=query)
                    assert response.status_code == 200, response.text
                    page = response.json()
                    assert len(page["jobs"]) <= limit
                    seen += page["jobs"]
                    token = page["next_page_token"]
                    if token is None:
                        return seen
                    assert len(page["jobs"]) == limit  # only a full page has a next page
                raise AssertionError("pagination did not end")

            newest_first = [job_id for job_id, _ in reversed(submitted)]
            every = walk(2)
            assert [j["id"] for j in every] == newest_first  # each job exactly once
            created = [j["timestamps"]["created_at"] for j in every]
            assert created == sorted(created, reverse=True)
            assert [j["id"] for j in walk(3)] == newest_first
            assert [j["id"] for j in walk(len(submitted))] == newest_first
            assert [j["id"] for j in walk(200)] == newest_first

            def ids(**params: Any) -> list[str]:
                return [j["id"] for j in walk(2, **params)]

            for kind in ("merge", "evaluate", "sweep"):
                assert ids(kind=kind) == [i for i in newest_first if dict(submitted)[i] == kind], kind
            assert ids(status="cancelled") == [i for i in newest_first if i in cancelled]
            assert ids(status="queued") == [i for i in newest_first if i not in cancelled]
            assert ids(status="running") == [] and ids(status="succeeded") == []
            assert ids(kind="sweep", status="cancelled") == [submitted[5][0]]
            assert ids(kind="sweep", status="queued") == [submitted[2][0]]
        finally:
            paused.__exit__(None, None, None)
        for job_id, _ in submitted:
            wait_job(client, job_id)
        done = [i for i in newest_first if i not in cancelled]
        assert ids(status="succeeded") == done
        assert ids(status="queued") == [] and ids(status="failed") == []
        assert ids(kind="merge", status="succeeded") == [submitted[6][0], submitted[0][0]]

        for bad in ({"page_token": "not-a-token"}, {"kind": "nope"}, {"status": "nope"},
                    {"limit": 0}, {"limit": 201}):
            response = client.get("/jobs", params=bad)
            assert response.status_code == 422, (bad, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")


# --- readiness -------------------------------------------------------------------------------


def test_readyz_is_503_until_the_model_is_resident(settings: Settings) -> None:
    """The worker process needs seconds to import torch and load the model; the API answers
    from the first moment, and refuses only what needs the model."""
    app = create_app(settings)
    with TestClient(app) as client:
        assert not app.state.service.ready  # the worker is still importing torch
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        body = not_ready.json()
        assert body["ready"] is False and body["status"] == "ok" and body["error"] is None
        assert body["model"] is None and body["workspace"] == "tiny"
        live = client.get("/healthz")
        assert live.status_code == 200 and live.json()["ready"] is False
        refused = client.post("/merges", json={"adapters": PAIR, "method": "ties"})
        assert refused.status_code == 503, refused.text
        assert "loading" in refused.json()["detail"]
        # Reads that need no model answer meanwhile.
        assert client.get("/jobs").json() == {"jobs": [], "next_page_token": None}
        assert client.get("/evaluations").json() == {"total": 0, "items": []}
        assert app.state.service.wait_ready(120)
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        for body in (ready.json(), client.get("/healthz").json()):
            assert body["ready"] is True and body["status"] == "ok" and body["error"] is None
            assert body["device"] == "cpu" and body["model"] == "base"
            assert body["workspace"] == "tiny"


def test_readyz_names_a_load_error(tiny_workspace: Path, tmp_path: Path) -> None:
    root = tiny_workspace.parent
    spec = yaml.safe_load(tiny_workspace.read_text())
    missing = tmp_path / "no-such-base"
    spec["base_model"]["path"] = str(missing)
    for task in spec["tasks"].values():
        task["adapter"] = str(root / task["adapter"])
        task["data"] = {split: str(root / path) for split, path in task["data"].items()}
    workspace = tmp_path / "broken" / "workspace.yaml"
    workspace.parent.mkdir()
    workspace.write_text(yaml.safe_dump(spec))
    app = create_app(Settings(workspace=workspace, artifacts_dir=tmp_path / "artifacts"))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert app.state.service.wait_ready(120) is False
        for route in ("/readyz", "/readyz", "/healthz"):
            response = client.get(route)
            assert response.status_code == (200 if route == "/healthz" else 503), response.text
            body = response.json()
            assert body["ready"] is False and body["status"] == "error"
            assert body["error"] and "no-such-base" in body["error"], body
        refused = client.post("/merges", json={"adapters": PAIR, "method": "ties"})
        assert refused.status_code == 503, refused.text
        assert "no-such-base" in refused.json()["detail"]
        assert client.get("/jobs").status_code == 200


# --- the CLI ---------------------------------------------------------------------------------


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from app.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_server_mode_submits_and_prints_the_result(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LORA_MERGE_TOKEN", raising=False)
    with thread_server(settings) as (client, _):
        url = str(client.base_url)
        code, out, err = _cli(["merge", "--adapters", *PAIR, "--method", "ties",
                               "--param", "k=30", "--server", url], capsys)
        assert code == 0, err
        printed = json.loads(out)
        job = client.get(f"/jobs/{printed['id']}").json()
        assert job["kind"] == "merge" and job["status"] == printed["status"] == "succeeded"
        assert printed["result"] == job["result"] and printed["error"] is None
        assert job["request"]["method_params"] == {"k": 30}
        assert Path(printed["result"]["run_dir"]).is_dir()
        assert printed["result"]["saved"] is False

        code, out, err = _cli(["evaluate", "--adapters", *PAIR, "--method", "weighted",
                               "--lambda", "0.3", "--tasks", "topic", "--server", url], capsys)
        assert code == 0, err
        printed = json.loads(out)
        assert printed["status"] == "succeeded"
        assert client.get(f"/jobs/{printed['id']}").json()["kind"] == "evaluate"
        assert set(printed["result"]["metrics"]) == {"topic"}

        code, out, err = _cli(["sweep", "--adapters", *PAIR, "--method", "weighted_delta",
                               "--search-type", "grid", "--grid", "lambda=0.3,0.7",
                               "--server", url], capsys)
        assert code == 0, err
        printed = json.loads(out)
        assert printed["status"] == "succeeded" and printed["result"]["num_trials"] == 2
        trials = client.get(f"/sweeps/{printed['id']}/trials").json()["trials"]
        assert [t["point"]["lambda"] for t in trials] == [0.3, 0.7]
        assert printed["result"]["best"]["objective"] == max(t["objective"] for t in trials)

        # A request the service refuses: exit code 2 and the problem's detail on stderr.
        code, out, err = _cli(["merge", "--adapters", "topic", "no_such_task", "--method", "ties",
                               "--server", url], capsys)
        assert code == 2 and out == ""
        assert "422" in err and "no_such_task" in err
        jobs = client.get("/jobs", params={"limit": 200}).json()["jobs"]
        assert len(jobs) == 3  # the refused request queued nothing


def _check_saved(result: dict[str, Any], job: dict[str, Any]) -> None:
    assert result["saved"] is True
    assert (Path(result["run_dir"]) / "adapter_model.safetensors").is_file()


def _check_train_split(result: dict[str, Any], job: dict[str, Any]) -> None:
    assert job["request"].get("split") == "train"
    assert result["split"] == "train"


def _check_subset(result: dict[str, Any], job: dict[str, Any]) -> None:
    assert result["subset"] and result["subset"].startswith("subset_n8_")


@pytest.mark.parametrize(("argv", "check"), [
    (["merge", "--save"], _check_saved),
    (["evaluate", "--split", "train"], _check_train_split),
    (["evaluate", "--max-samples", "8"], _check_subset),
], ids=["merge--save", "evaluate--split", "evaluate--max-samples"])
def test_cli_server_mode_honours_the_local_flags(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    argv: list[str], check: Any,
) -> None:
    """`--server` should mean the same job as without it, only run elsewhere."""
    monkeypatch.delenv("LORA_MERGE_TOKEN", raising=False)
    with thread_server(settings) as (client, _):
        code, out, err = _cli([argv[0], "--adapters", *PAIR, "--method", "ties", *argv[1:],
                               "--server", str(client.base_url)], capsys)
        assert code == 0, err
        printed = json.loads(out)
        assert printed["status"] == "succeeded", printed
        check(printed["result"], client.get(f"/jobs/{printed['id']}").json())


def _schema(db: Path) -> tuple[list[tuple[str, str]], list[str]]:
    with sqlite3.connect(db) as connection:
        tables = connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type IN ('table', 'index') ORDER BY name"
        ).fetchall()
        versions = [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
    return tables, versions


def test_db_upgrade_creates_the_tables_and_is_idempotent(tmp_path: Path) -> None:
    from alembic.script import ScriptDirectory

    from app.db import alembic_config

    db = tmp_path / "fresh" / "service.db"
    db.parent.mkdir()
    env = {**os.environ, "LORA_MERGE_DATABASE_URL": f"sqlite:///{db}",
           "LORA_MERGE_ARTIFACTS_DIR": str(tmp_path / "artifacts"), "HF_HUB_OFFLINE": "1"}
    entry = Path(sys.executable).parent / "lora-merge"
    commands = [[sys.executable, "-m", "app.cli", "db", "upgrade"]]
    commands.append([str(entry), "db", "upgrade"] if entry.is_file() else commands[0])
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()

    schemas = []
    for command in commands:
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert "database at head" in done.stdout and str(db) in done.stdout
        schemas.append(_schema(db))
    tables, versions = schemas[0]
    names = {name for name, _ in tables}
    assert {"jobs", "sweep_trials", "eval_entries", "eval_task_results", "alembic_version"} <= names
    assert versions == [head]
    assert schemas[1] == schemas[0]  # the second upgrade changed nothing
    with sqlite3.connect(db) as connection:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(jobs)")}
        assert {"id", "kind", "status", "request", "created_at", "idempotency_key"} <= columns
        assert connection.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
