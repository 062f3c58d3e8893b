"""Train the causal demo's adapters: one LoRA per task on SmolLM2-135M-Instruct, for label scoring.

Each adapter (r=8, alpha=16 on q/k/v/o_proj) learns to continue a task's prompt (its
`prompt_template` in `workspaces/causal/workspace.yaml`) with the label: the loss covers only
the label's tokens, tokenized exactly as `causal_lm_label_scoring` scores them (the prompt's
ids, then `label_prefix + label` tokenized on its own). Deterministic on a given machine and
torch build: fixed seeds, a stratified train subset, a seeded batch order.

    HF_HUB_OFFLINE=1 python scripts/train_causal_adapters.py            # all three (minutes, CPU)
    python scripts/train_causal_adapters.py --tasks sentiment --steps 2 --out /tmp/adapters
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from merging_core.evaluation.data import load_task_data  # noqa: E402
from merging_core.evaluation.workspace import load_workspace  # noqa: E402

WORKSPACE = ROOT / "workspaces" / "causal" / "workspace.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Steps per task (batch 16): about 2.5 s a step on 2 CPU cores; more labels need more steps.
STEPS = {"sentiment": 40, "intent": 60, "banking": 100}


def stratified(labels: list[str], per_label: int, seed: int) -> list[int]:
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_label[label].append(index)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        chosen += members[:per_label]
    return sorted(chosen)


def train_task(task: str, args: argparse.Namespace, out: Path) -> dict[str, object]:
    workspace = load_workspace(args.workspace)
    config = workspace.task(task)
    base = workspace.base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = load_task_data(workspace.data_path(task, "train"), text_column=config.text_column,
                          label_column=config.label_column, prompt_template=config.prompt_template)
    assert data.labels is not None
    labels = sorted(set(data.labels))
    per_label = max(8, args.examples // len(labels))
    rows = stratified(data.labels, per_label, seed=0)
    prefix = config.effective_label_prefix
    examples = []
    for index in rows:
        prompt = tokenizer(data.texts[index], truncation=True, max_length=config.max_length)["input_ids"]
        target = tokenizer(prefix + data.labels[index], add_special_tokens=False)["input_ids"]
        examples.append((prompt + target, [-100] * len(prompt) + target))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    order = random.Random(1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    started = time.perf_counter()
    losses = []
    steps = args.steps or STEPS.get(task, 80)
    for step in range(steps):
        batch = order.sample(examples, min(args.batch_size, len(examples)))
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        targets = torch.tensor([t + [-100] * (width - len(t)) for _, t in batch])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == steps - 1:
            print(f"{task} step {step + 1}/{steps} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    target_dir = out / task
    # The base's name, not this machine's cache path, so the shipped config is the same anywhere.
    model.peft_config["default"].base_model_name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(target_dir)
    (target_dir / "README.md").unlink(missing_ok=True)  # peft's empty model card
    summary = {"task": task, "examples": len(examples), "labels": len(labels), "steps": steps,
               "batch_size": args.batch_size, "lr": args.lr, "first_loss": losses[0],
               "last_loss": losses[-1], "seconds": round(time.perf_counter() - started, 1),
               "torch": torch.__version__}
    (target_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=WORKSPACE)
    parser.add_argument("--tasks", nargs="+", default=["intent", "sentiment", "banking"])
    parser.add_argument("--steps", type=int, default=None, help=f"steps per task (default {STEPS})")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--examples", type=int, default=600, help="stratified train rows per task")
    parser.add_argument("--out", type=Path, default=WORKSPACE.parent / "adapters")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    for task in args.tasks:
        print(json.dumps(train_task(task, args, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
