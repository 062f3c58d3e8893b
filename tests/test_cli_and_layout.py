"""The CLI and the on-disk run bundle layout."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from merging_core import run_merge
from merging_core.cli import main


def test_cli_merge_with_legacy_flags_and_task_names(adapters, tmp_path, capsys) -> None:
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(yaml.safe_dump(
        {"tasks": {name: {"adapter": str(path)} for name, path in adapters.items()}}
    ))
    code = main([
        "merge", "--adapters", "alpha", "beta", "--method", "weighted_delta", "--lambda", "0.7",
        "--workspace", str(workspace), "--output-dir", str(tmp_path / "out"), "--save",
    ])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp_path / "out" / "merged" / "weighted_delta" / "alpha_beta" / "runs"
    assert (run_dir / "adapter_model.safetensors").is_file()
    metadata = json.loads((run_dir / "merge_metadata.json").read_text())
    assert metadata["params"] == {"lambda": 0.7}


def test_cli_config_and_errors(adapters, tmp_path, capsys) -> None:
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump(
        {"adapters": [str(p) for p in adapters.values()], "method": "ties", "output_dir": str(tmp_path / "a")}
    ))
    assert main(["merge", "--config", str(config), "--param", "k=30"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter_path"] is None
    assert main(["merge", "--config", str(config), "--param", "k=300"]) == 2
    assert "'k'=300 is out of range; allowed [0, 100]" in capsys.readouterr().err
    assert main(["methods"]) == 0
    assert "ties:" in capsys.readouterr().out


def test_run_bundle_contents_and_same_second_runs(adapters, tmp_path) -> None:
    config = {"adapters": [str(p) for p in adapters.values()], "method": "ties",
              "method_params": {"k": 25}}
    first = run_merge(config, artifacts_dir=tmp_path, save=True)
    second = run_merge(config, artifacts_dir=tmp_path, save=True)
    third = run_merge(config, artifacts_dir=tmp_path)
    names = [first.run_dir.name, second.run_dir.name, third.run_dir.name]
    assert len(set(names)) == 3
    assert all(name.startswith("run_") for name in names)
    assert first.merge_tag == second.merge_tag
    files = sorted(p.name for p in first.run_dir.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "merge_metadata.json", "summary.json"]
    assert sorted(p.name for p in third.run_dir.iterdir()) == ["merge_metadata.json", "summary.json"]
    metadata = json.loads((first.run_dir / "merge_metadata.json").read_text())
    for key in ("params", "method_params", "lambda_policy", "transforms", "optimizer", "versions"):
        assert key in metadata
    assert metadata["versions"]["peft"] and metadata["versions"]["torch"]
    checksums = metadata["adapters"][0]["checksums"]
    assert len(checksums["adapter_model.safetensors"]) == 64
    summary = json.loads((first.run_dir / "summary.json").read_text())
    assert summary["run_id"] == first.run_dir.name and summary["saved"]
    leftovers = [p for p in first.run_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_runs_in_the_same_second_get_suffixes(tmp_path) -> None:
    from datetime import datetime, timezone

    from merging_core.runtime.paths import claim_run_dir

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    names = [claim_run_dir(tmp_path, now).name for _ in range(3)]
    assert names == ["run_20260102_030405", "run_20260102_030405_1", "run_20260102_030405_2"]


def test_cli_evaluate_and_sweep_on_a_workspace(tiny_workspace, tmp_path, capsys) -> None:
    out = tmp_path / "artifacts"
    common = ["--workspace", str(tiny_workspace), "--output-dir", str(out)]
    assert main(["evaluate", "--adapters", "topic", "mood", "--method", "ties", "--save",
                 "--max-samples", "12", *common]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert set(evaluated["metrics"]) == {"topic", "mood"}
    run_dir = next((out / "merged" / "ties" / "mood_topic" / "runs").iterdir())
    assert main(["evaluate", "--adapter", str(run_dir), "--max-samples", "12", *common]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["merge_tag"].startswith("saved_ties")
    assert main(["sweep", "--adapters", "topic", "mood", "--method", "weighted_delta",
                 "--search-type", "grid", "--grid", "lambda=0.2,0.8", *common]) == 0
    swept = json.loads(capsys.readouterr().out)
    assert swept["trials"] == 2 and Path(swept["summary"]).is_file()
    assert main(["evaluate", "--adapters", "topic", "mood", "--method", "ties", "--tasks", "asr",
                 *common]) == 2
    assert "unknown task 'asr'" in capsys.readouterr().err
