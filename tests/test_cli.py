"""The CLI seam: one set of job commands and one flags -> config function, shared by the
library's `lora-merge` (merging_core.cli) and the service's (app.cli, which adds serve, db and
--server)."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app import cli as app_cli
from app.settings import DEMO_WORKSPACE
from merging_core import cli as core_cli
from merging_core.cli import ProgressBar, config_from_args
from merging_core.errors import MergeError

SERVER = ["--server", "http://service.test"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LORA_MERGE_WORKSPACE", "LORA_MERGE_ARTIFACTS_DIR", "LORA_MERGE_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _pair(adapters: dict[str, Path]) -> list[str]:
    return [str(adapters["alpha"]), str(adapters["gamma"])]


# --- aliases ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("alias", "canonical"), [
    ("merge-sweep", "sweep"), ("evaluate-merged", "evaluate"), ("merge", "merge"),
])
def test_seed_command_names_are_aliases(alias: str, canonical: str) -> None:
    argv = [alias, "--adapters", "a", "b", "--method", "weighted_delta", "--lambda", "0.5"]
    local = core_cli.build_parser().parse_args(argv)
    remote = app_cli.build_parser().parse_args([*argv, *SERVER])
    assert local.command == remote.command == canonical
    assert remote.server == "http://service.test"
    assert canonical in app_cli.ENDPOINTS
    assert config_from_args(local) == config_from_args(remote)


def test_alias_runs_the_same_command(tiny_workspace: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "artifacts"
    assert core_cli.main(["evaluate-merged", "--adapters", "topic", "mood", "--method", "ties",
                          "--max-samples", "8", "--tasks", "topic",
                          "--workspace", str(tiny_workspace), "--output-dir", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["metrics"]) == {"topic"}
    assert Path(printed["results_file"]).is_relative_to(out)


def test_local_evaluate_runs_an_optimizer_on_the_workspace(tiny_workspace: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "adamerging.yaml"
    config.write_text(json.dumps({"adapters": ["topic", "mood"], "method": "weighted_delta",
                                  "optimizer": {"name": "adamerging", "params": {"steps": 2}}}))
    out = tmp_path / "artifacts"
    assert core_cli.main(["evaluate", "--config", str(config), "--max-samples", "8",
                          "--workspace", str(tiny_workspace), "--output-dir", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["metrics"]) == {"topic", "mood"}
    assert list(out.glob("merged/weighted_delta/mood_topic/runs/run_*/adamerging_lambdas.json"))


def test_local_merge_runs_regmean_on_the_workspace(tiny_workspace: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`lora-merge merge --workspace` gives RegMean the resident model to collect its Grams on."""
    out = tmp_path / "artifacts"
    assert core_cli.main(["merge", "--adapters", "topic", "mood", "--method", "regmean",
                          "--workspace", str(tiny_workspace), "--output-dir", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["merge_tag"].startswith("regmean")
    assert list(out.glob("grams/*/*/manifest.json"))


# --- flags -> config, the same locally and with --server --------------------------------------


def test_config_from_args_is_the_same_locally_and_with_server(tmp_path: Path) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "adapters": ["topic", "mood"], "method": "weighted_delta",
        "method_params": {"lambda": 0.5},
        "search": {"type": "bayes", "budget": 9, "space": {"lambda": {"min": 0, "max": 1}}},
    }))
    argv = ["sweep", "--config", str(config), "--search-type", "grid", "--grid",
            "lambda=[0.2,0.8],[0.5,0.5]", "--grid", "k=10,20", "--budget", "4", "--save",
            "--split", "train", "--max-samples", "8", "--tasks", "topic", "--param", "k=5"]
    local = config_from_args(core_cli.build_parser().parse_args(argv))
    remote = config_from_args(app_cli.build_parser().parse_args([*argv, *SERVER]))
    assert local == remote
    body = remote.model_dump(mode="json", exclude_unset=True)
    assert body["search"]["type"] == "grid" and body["search"]["budget"] == 4
    assert body["search"]["grid"] == {"lambda": [[0.2, 0.8], [0.5, 0.5]], "k": [10, 20]}
    assert body["search"]["space"] == {"lambda": {"min": 0, "max": 1}}  # the file's, kept
    assert body["method_params"] == {"lambda": 0.5, "k": 5}
    assert body["save_merged"] is True and body["split"] == "train"
    assert body["eval_subset"] == {"max_samples": 8, "stratified": True}
    assert body["eval_tasks"] == ["topic"]


def test_config_from_args_only_dumps_what_was_said() -> None:
    args = core_cli.build_parser().parse_args(["merge", "--adapters", "a", "b", "--method", "ties"])
    assert config_from_args(args).model_dump(mode="json", exclude_unset=True) == {
        "adapters": ["a", "b"], "method": "ties"}
    saved = core_cli.build_parser().parse_args(
        ["merge", "--adapters", "a", "b", "--method", "ties", "--save", "--save-rank", "16"])
    dumped = config_from_args(saved).model_dump(mode="json", exclude_unset=True)
    assert dumped["save_merged"] is True and dumped["save_rank"] == 16


@pytest.mark.parametrize(("argv", "message"), [
    (["merge", "--adapters", "a", "b"], "give --config, or both --adapters and --method"),
    (["merge", "--adapters", "a", "b", "--method", "ties", "--param", "k"], "--param expects NAME=VALUE"),
    (["sweep", "--adapters", "a", "b", "--method", "ties", "--grid", "k"], "--grid expects NAME=V1,V2"),
    (["sweep", "--adapters", "a", "b", "--method", "ties", "--budget", "0"], "search.budget"),
])
def test_config_from_args_refuses_bad_flags(argv: list[str], message: str) -> None:
    with pytest.raises(MergeError, match=message):
        config_from_args(core_cli.build_parser().parse_args(argv))


class _FakeService:
    """Records what `--server` posts; every job has already succeeded."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, Any]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        job = {"id": "job-1", "status": "succeeded", "result": {"ok": True}, "error": None,
               "progress": {"done": 1, "total": 1, "message": "done"}}
        if request.method == "POST":
            self.posted.append((request.url.path, json.loads(request.content)))
            return httpx.Response(202, json=job)
        return httpx.Response(200, json=job)


@pytest.mark.parametrize(("command", "endpoint"), [
    ("merge", "/merges"), ("evaluate-merged", "/evaluations"), ("merge-sweep", "/sweeps"),
])
def test_server_mode_posts_the_config_dump(command: str, endpoint: str,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    service = _FakeService()
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kwargs: real_client(
        transport=httpx.MockTransport(service.handle), **kwargs))
    argv = [command, "--adapters", "topic", "mood", "--method", "weighted_delta", "--save"]
    if command != "merge":
        argv += ["--split", "train", "--max-samples", "8"]
    if command == "merge-sweep":
        argv += ["--search-type", "grid", "--grid", "lambda=0.3,0.7"]
    assert app_cli.main([*argv, *SERVER]) == 0
    assert json.loads(capsys.readouterr().out)["result"] == {"ok": True}
    local = config_from_args(core_cli.build_parser().parse_args(argv))
    assert service.posted == [(endpoint, local.model_dump(mode="json", exclude_unset=True))]
    body = service.posted[0][1]
    assert body["save_merged"] is True
    if command == "merge-sweep":
        assert body["search"] == {"type": "grid", "grid": {"lambda": [0.3, 0.7]}}


def test_server_mode_refuses_a_saved_adapter(capsys: pytest.CaptureFixture[str]) -> None:
    assert app_cli.main(["evaluate", "--adapter", "some/run", *SERVER]) == 2
    assert "locally" in capsys.readouterr().err


# --- where local commands read and write -------------------------------------------------------


def test_local_merge_honours_the_artifacts_env(adapters: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from_env = tmp_path / "from_env"
    monkeypatch.setenv("LORA_MERGE_ARTIFACTS_DIR", str(from_env))
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"adapters": _pair(adapters), "method": "task_vector",
                                      "output_dir": str(tmp_path / "from_config")}))
    merge = ["merge", "--adapters", *_pair(adapters), "--method", "task_vector"]

    assert core_cli.main(merge) == 0
    assert Path(json.loads(capsys.readouterr().out)["run_dir"]).is_relative_to(from_env)
    assert core_cli.main(["merge", "--config", str(config)]) == 0  # the env outranks the config
    assert Path(json.loads(capsys.readouterr().out)["run_dir"]).is_relative_to(from_env)
    flag = tmp_path / "from_flag"
    assert core_cli.main([*merge, "--output-dir", str(flag)]) == 0  # the flag outranks the env
    assert Path(json.loads(capsys.readouterr().out)["run_dir"]).is_relative_to(flag)

    monkeypatch.delenv("LORA_MERGE_ARTIFACTS_DIR")
    assert core_cli.main(["merge", "--config", str(config)]) == 0
    assert Path(json.loads(capsys.readouterr().out)["run_dir"]).is_relative_to(tmp_path / "from_config")


def test_app_cli_merges_with_the_service_workspace_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Task names resolve in the service's default workspace (an absolute path), not in ./."""
    assert DEMO_WORKSPACE.is_absolute() and DEMO_WORKSPACE.is_file()
    monkeypatch.chdir(tmp_path)
    merge = ["merge", "--adapters", "intent", "sentiment", "--method", "task_vector"]
    assert core_cli.main(merge) == 2  # no workspace in this directory: unknown task names
    capsys.readouterr()
    assert app_cli.main(merge) == 0
    run_dir = Path(json.loads(capsys.readouterr().out)["run_dir"])
    assert run_dir.resolve().is_relative_to((tmp_path / "artifacts").resolve())
    metadata = json.loads((run_dir / "merge_metadata.json").read_text())
    assert [a["name"] for a in metadata["adapters"]] == ["intent", "sentiment"]


# --- the service's CLI adds serve, db and --server, through public names only -------------------


def test_app_cli_adds_serve_db_and_server_to_the_job_commands() -> None:
    parser = app_cli.build_parser()
    assert parser.parse_args(["serve", "--port", "8001"]).port == 8001
    assert parser.parse_args(["db", "reindex"]).action == "reindex"
    for command in ("merge", "evaluate", "sweep", "evaluate-merged", "merge-sweep"):
        args = parser.parse_args([command, "--adapters", "a", "b", "--method", "ties", *SERVER])
        assert args.server == "http://service.test"
    assert parser.parse_args(["methods", "--json"]).json is True
    with pytest.raises(SystemExit):
        parser.parse_args(["methods", *SERVER])
    with pytest.raises(SystemExit):  # the library's own CLI has no service
        core_cli.build_parser().parse_args(["merge", "--adapters", "a", "--method", "ties", *SERVER])
    with pytest.raises(SystemExit):
        core_cli.build_parser().parse_args(["serve"])


def test_app_cli_uses_only_public_names_of_merging_core_cli() -> None:
    source = Path(app_cli.__file__).read_text()
    assert "core_cli._" not in source
    assert "job_parsers" not in source and "parser.commands" not in source
    imported = [alias.name for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom) and node.module == "merging_core.cli"
                for alias in node.names]
    assert imported and not [name for name in imported if name.startswith("_")]
    module_imports = [node for node in ast.walk(ast.parse(source))
                      if isinstance(node, ast.ImportFrom) and node.module == "merging_core"
                      and any(alias.name == "cli" for alias in node.names)]
    assert module_imports == []  # no module handle to reach private names through


def test_progress_bar_logs_the_best_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lora-merge"), ProgressBar("sweep") as bar:
        bar(1, 4, "trial 1", {"best": {"objective": 0.25}})
        bar(2, 4, "trial 2")  # the three-argument form still works
    assert "sweep 1/4 trial 1 best=0.2500" in caplog.text
    assert "sweep 2/4 trial 2" in caplog.text
