"""AdaMerging memory and speed: streaming factored hooks vs the functional-clone legacy path.

For each model shape (the demo's all-MiniLM-L6-v2, and a random 1B-parameter-shaped Llama:
hidden 2048, intermediate 5632, 8 layers, LoRA r=16 on every linear layer, 2 adapters), each
implementation runs a few AdaMerging steps in a fresh process. Reported per case: seconds per
step and the peak resident memory added by training (peak RSS minus RSS once the model, adapters
and data are loaded, every base weight paged in). Goal: streaming_parametrize's peak at least 3x lower than
functional_clone_legacy's on the 1B shape.

    .venv/bin/python bench/adamerging_bench.py            # both shapes
    .venv/bin/python bench/adamerging_bench.py --shapes demo --steps 3
    .venv/bin/python bench/adamerging_bench.py --write    # bench/results/adamerging_bench_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before torch: importing common puts the checkout on sys.path and Hugging Face offline.
from common import (MB, RESULTS_DIR, ROOT, PeakRssSampler, publish, rss_bytes, utc_stamp,
                    versions_line)

RESULTS = RESULTS_DIR / "adamerging_bench_cpu.md"
IMPLS = ("streaming_parametrize", "functional_clone_legacy")


def build_1b_workspace(root: Path) -> Path:
    """A random 1B-shaped Llama classifier with two synthetic tasks and r=16 adapters."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from scripts.make_tiny_workspace import WORDS, minilm_dir

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=30522,
                         num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(root / "base")
    import random

    rng = random.Random(0)
    tasks = {}
    for seed, task in enumerate(("alpha", "beta"), start=1):
        (root / "data" / task).mkdir(parents=True)
        with (root / "data" / task / "train.jsonl").open("w") as handle:
            for row in range(64):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
                handle.write(json.dumps({"text": text, "label": ["no", "yes"][row % 2]}) + "\n")
        torch.manual_seed(seed)
        lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, task_type="SEQ_CLS",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"], modules_to_save=["score"])
        get_peft_model(model, lora).save_pretrained(root / "adapters" / task)
        model = LlamaForSequenceClassification.from_pretrained(root / "base")
        tasks[task] = {"adapter": f"adapters/{task}", "data": {"train": f"data/{task}/train.jsonl"},
                       "batch_size": 4, "max_length": 16}
    workspace = {"name": "llama-1b-shaped", "tasks": tasks,
                 "base_model": {"path": "base", "model_class": "sequence_classification", "device": "cpu"}}
    (root / "workspace.yaml").write_text(yaml.safe_dump(workspace))
    return root / "workspace.yaml"


def run_case(workspace: Path, tasks: list[str], impl: str, steps: int, batch_size: int) -> dict:
    """One case, in this (fresh) process."""
    from merging_core import prepare_merge
    from merging_core.evaluation.evaluate import EvalSession
    from merging_core.evaluation.workspace import load_workspace
    from merging_core.plugins.adamerging import AdaMergingTrainer
    from merging_core.plugins.optimizers import build_optimizer

    session = EvalSession.from_workspace(load_workspace(workspace), tempfile.mkdtemp(), device="cpu")
    output = prepare_merge({"adapters": tasks, "method": "task_vector"},
                           task_registry=session.workspace.task_registry(),
                           adapter_cache=session.adapter_cache)
    _, params = build_optimizer("adamerging", {"merge_impl": impl, "batch_size": batch_size,
                                               "split": "train", "samples_per_task": 64})
    trainer = AdaMergingTrainer(session, output.adapters, output.modules, tasks, params)
    import gc

    import torch

    with torch.no_grad():  # page in every base weight (from_pretrained may leave them mmap'ed),
        for parameter in session.holder.model.parameters():  # so the baseline holds the model
            parameter.sum()
    gc.collect()
    baseline = rss_bytes() / MB
    times = []
    # Sampled above `baseline` (the loaded model): ru_maxrss would include the load.
    with session.holder.frozen(), PeakRssSampler(interval_s=0.005) as sampler:
        trainer.step()  # warm-up
        for _ in range(steps):
            started = time.perf_counter()
            trainer.step()
            times.append(time.perf_counter() - started)
    return {
        "impl": impl,
        "seconds_per_step": sum(times) / len(times),
        "baseline_mb": baseline,
        "peak_added_mb": max(sampler.peak_bytes / MB - baseline, 0.0),
        "params_m": sum(p.numel() for p in session.holder.model.parameters()) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["demo", "1b"], choices=["demo", "1b"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        workspace, tasks, impl, steps, batch = json.loads(args.case)
        print(json.dumps(run_case(Path(workspace), tasks, impl, steps, batch)))
        return

    import torch

    shapes = {}
    if "demo" in args.shapes:
        shapes["demo (all-MiniLM-L6-v2, 3 tasks)"] = (ROOT / "workspaces/demo/workspace.yaml",
                                                       ["intent", "banking", "sentiment"], 16)
    scratch = Path(tempfile.mkdtemp(prefix="adamerging_bench_"))
    if "1b" in args.shapes:
        shapes["1B-shaped Llama (hidden 2048, 8 layers, r=16, 2 tasks)"] = (
            build_1b_workspace(scratch), ["alpha", "beta"], 2)
    rows = []
    for label, (workspace, tasks, batch) in shapes.items():
        measured = {}
        for impl in IMPLS:
            payload = json.dumps([str(workspace), tasks, impl, args.steps, batch])
            completed = subprocess.run([sys.executable, __file__, "--case", payload], capture_output=True,
                                       text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            measured[impl] = json.loads(completed.stdout.strip().splitlines()[-1])
        ratio = measured["functional_clone_legacy"]["peak_added_mb"] / max(
            measured["streaming_parametrize"]["peak_added_mb"], 1.0)
        for impl in IMPLS:
            m = measured[impl]
            rows.append(f"| {label} | {impl} | {m['params_m']:.0f}M | {m['seconds_per_step']:.2f} | "
                        f"{m['peak_added_mb']:.0f} | {m['baseline_mb']:.0f} |")
        rows.append(f"| {label} | legacy / streaming peak | | | {ratio:.1f}x | |")
        if label.startswith("1B"):
            verdict = "PASS" if ratio >= 3 else "FAIL"
            rows.append(f"| {label} | goal: streaming peak at least 3x lower | | | {verdict} | |")
    table = "\n".join([
        "| model | merge_impl | params | s/step | peak MB added | RSS MB after load |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    note = (f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), float32, "
            f"{versions_line('torch')}; {args.steps} steps after one "
            f"warm-up; delta_residency cpu_stream; {utc_stamp('%Y-%m-%d')}.")
    publish(table + "\n\n" + note, RESULTS if args.write else None)


if __name__ == "__main__":
    main()
