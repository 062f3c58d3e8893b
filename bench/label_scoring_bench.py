"""Label scoring: one sequence per label (the old path) against each prompt computed once.

On the causal workspace's base model (SmolLM2-135M-Instruct, float32, CPU, 2 threads), for
2 labels (sentiment), 10 labels (banking rows of its first 10 labels) and 77 labels (banking),
on the same stratified rows of each task's test split with its prompt template, it times:
- `old`: every (prompt + label) sequence in one padded batch, as `causal_lm_label_scoring`
  did before (batch_size // labels prompts a batch);
- `shared`: `merging_core.evaluation.evaluators.label_scores` (the prompts run once, their
  labels packed behind its key/value cache), on the same batches.
It reports seconds per 100 rows, the largest score difference, whether the predictions are
identical, and the token-count ceiling on the speedup: tokens the old path computes over the
tokens the shared path computes. With `--write` it writes bench/results/label_scoring_bench_cpu.md
and the README's table. Goals: at least 3x faster at 10 labels; at 77 labels, at
least 0.8 of the ceiling.

    .venv/bin/python bench/label_scoring_bench.py --write    # minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

from common import RESULTS_DIR, ROOT, cpu_line, publish, replace_marked_block, utc_stamp, versions_line

import torch  # noqa: E402

from merging_core.evaluation.data import load_task_data  # noqa: E402
from merging_core.evaluation.evaluators import label_scores, length_sorted_batches  # noqa: E402
from merging_core.evaluation.workspace import load_workspace  # noqa: E402

WORKSPACE = ROOT / "workspaces" / "causal" / "workspace.yaml"
RESULTS_FILE = RESULTS_DIR / "label_scoring_bench_cpu.md"


def old_scores(model: torch.nn.Module, prompts: Sequence[list[int]], label_ids: Sequence[list[int]],
               pad: int) -> torch.Tensor:
    """The previous evaluator: every prompt + label as its own sequence, one padded batch."""
    sequences, spans = [], []
    for prompt in prompts:
        for ids in label_ids:
            sequences.append(prompt + ids)
            spans.append((len(prompt), len(ids)))
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    log_probs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)
    scores = []
    for row, (start, length) in enumerate(spans):
        positions = torch.arange(start - 1, start + length - 1)
        scores.append(float(log_probs[row, positions, input_ids[row, start:start + length]].sum()))
    return torch.tensor(scores).view(len(prompts), len(label_ids))


def rows_for(labels: list[str], keep: list[str], count: int) -> list[int]:
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        if label in keep:
            by_label[label].append(index)
    rng = random.Random(0)
    chosen: list[int] = []
    while len(chosen) < count and any(by_label.values()):
        for label in sorted(by_label):
            if by_label[label] and len(chosen) < count:
                chosen.append(by_label[label].pop(rng.randrange(len(by_label[label]))))
    return sorted(chosen)


def run_case(name: str, task: str, n_labels: int, rows: int, model: torch.nn.Module, tokenizer: object,
             workspace: object) -> tuple[str, float, float, bool]:
    config = workspace.task(task)  # type: ignore[attr-defined]
    data = load_task_data(workspace.data_path(task, "test"), text_column=config.text_column,  # type: ignore[attr-defined]
                          label_column=config.label_column, prompt_template=config.prompt_template)
    assert data.labels is not None
    labels = sorted(set(data.labels))[:n_labels]
    chosen = rows_for(data.labels, labels, rows)
    texts = [data.texts[i] for i in chosen]
    label_ids = [tokenizer(config.effective_label_prefix + label, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
                 for label in labels]
    prompts_all = [tokenizer(text, truncation=True, max_length=config.max_length)["input_ids"] for text in texts]  # type: ignore[operator]
    pad = tokenizer.pad_token_id or 0  # type: ignore[attr-defined]
    batches = length_sorted_batches(texts, max(1, config.batch_size // len(labels)))
    results = {}
    with torch.inference_mode():
        for path in ("old", "shared"):
            scores = torch.zeros(len(texts), len(labels))
            started = time.perf_counter()
            for batch in batches:
                prompts = [prompts_all[i] for i in batch]
                if path == "old":
                    scores[batch] = old_scores(model, prompts, label_ids, pad)
                else:
                    scores[batch] = label_scores(model, prompts, label_ids, pad, torch.device("cpu")).cpu()
            results[path] = (time.perf_counter() - started, scores)
    (old_s, old), (new_s, new) = results["old"], results["shared"]
    label_tokens = sum(len(ids) for ids in label_ids)
    old_tokens = sum(len(p) * len(labels) + label_tokens for p in prompts_all)
    new_tokens = sum(len(p) + label_tokens for p in prompts_all)
    ceiling = old_tokens / new_tokens
    speedup = old_s / new_s
    same = bool(torch.equal(old.argmax(-1), new.argmax(-1)))
    diff = float((old - new).abs().max())
    print(f"{name}: old {old_s:.1f} s, shared {new_s:.1f} s, x{speedup:.2f} (ceiling x{ceiling:.2f})",
          file=sys.stderr)
    return (f"| {name} | {len(texts)} | {100 * old_s / len(texts):.2f} | {100 * new_s / len(texts):.2f} | "
            f"{speedup:.2f}x | {ceiling:.2f}x | {speedup / ceiling:.2f} | {diff:.2e} | "
            f"{'yes' if same else 'NO'} |"), speedup, ceiling, same


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40, help="stratified test rows per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS_FILE}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # before timing: a busy machine slows both paths
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workspace = load_workspace(WORKSPACE)
    base = workspace.base_model_path()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows, verdicts = [], []
    for name, task, n_labels in (("sentiment, 2 labels", "sentiment", 2),
                                 ("banking, 10 labels", "banking", 10),
                                 ("banking, 77 labels", "banking", 77)):
        row, speedup, ceiling, same = run_case(name, task, n_labels, args.rows, model, tokenizer, workspace)
        rows.append(row)
        if n_labels == 10:
            verdicts.append(f"- Goal: at least 3x faster at 10 labels, identical predictions: "
                            f"{speedup:.2f}x -> **{'PASS' if speedup >= 3 and same else 'FAIL'}**")
        if n_labels == 77:
            verdicts.append(f"- Goal: at 77 labels at least 0.8 of the ceiling ({ceiling:.2f}x): "
                            f"{speedup:.2f}x = {speedup / ceiling:.2f} of it -> "
                            f"**{'PASS' if speedup >= 0.8 * ceiling and same else 'FAIL'}**")
    table = ["| case | rows | old s / 100 rows | shared s / 100 rows | speedup | token ceiling "
             "| of ceiling | max score diff | same predictions |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|", *rows, "", *verdicts]
    text = "\n".join([
        "# Label scoring: one sequence per label vs each prompt computed once (CPU)", "",
        f"- date (UTC): {utc_stamp()}", f"- {cpu_line(load)}",
        f"- versions: {versions_line('torch', 'transformers')}",
        "- model: SmolLM2-135M-Instruct (the causal workspace's base, float32), stratified test rows",
        "", *table, "",
    ])
    publish(text, RESULTS_FILE if args.write else None)
    if args.write:
        replace_marked_block(ROOT / "README.md", "<!-- label-scoring:start -->", "<!-- label-scoring:end -->",
                             [f"{args.rows} stratified test rows per case; {utc_stamp()} UTC; "
                              f"{versions_line('torch', 'transformers')}.", "", *table])
    return 0


if __name__ == "__main__":
    sys.exit(main())
