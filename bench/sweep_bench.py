"""Per-trial overhead of our sweeps vs a script user's reload-per-trial PEFT baseline.

Both sides evaluate the same merges (weighted_delta of the adapters with a fixed list of
lambdas) on the same stratified eval subset of every merged task, with the same batching, and
time every model forward pass with a wrapper around the transformer's `forward`:

* **ours**: one `EvalSession` (base model loaded once), a grid sweep through `run_sweep`:
  per trial `prepare_merge` (in-memory merge), `ModelHolder.apply`, each task's head, evaluate,
  `restore`, results and trial files, the sweep summary (and its plot at the end, amortised).
  A one-point warm-up sweep runs first (adapter and data loading, the cached reference and
  base metrics, first imports) and is reported separately, as is loading the model.
* **baseline** (what a script user does per trial): load tokenizer and base model from disk
  (`AutoModelForSequenceClassification.from_pretrained`), load every adapter with PEFT
  (`PeftModel.from_pretrained` + `load_adapter`), merge with
  `add_weighted_adapter(..., combination_type="cat")` (exactly sum_i w_i * delta_i, like
  weighted_delta), activate the merged adapter, and for each task install that task's
  classifier head (read from its adapter file) and evaluate; then discard everything.
  PEFT refuses `add_weighted_adapter` over adapters that each keep the classifier in
  `modules_to_save`, and its loader cannot put heads of different sizes on one base, so the
  baseline loads the adapters with `modules_to_save=None, task_type=None` (LoRA weights only,
  `ignore_mismatched_sizes=True`) and swaps the task head in by hand. The eval subset is
  drawn once (generous to the baseline); it tokenises per trial, while ours reuses the padded
  batches the resident model keeps (`ModelHolder.encode`, part of what staying resident saves;
  a few tens of milliseconds per trial here). One warm-up
  baseline trial is excluded too.

overhead = trial wall time - forward time (merge, apply/restore or reload, tokenisation,
bookkeeping, I/O). Goals: our overhead < 10% of our trial time; our trials/hour >= 5x the
baseline's.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sweep_bench.py            # demo workspace, prints
    HF_HUB_OFFLINE=1 .venv/bin/python bench/sweep_bench.py --write    # also writes
                                                                     # bench/results/sweep_bench_cpu.md
    python scripts/make_tiny_workspace.py /tmp/tinyws                   # a quick smoke run:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/sweep_bench.py --workspace /tmp/tinyws/workspace.yaml \\
        --tasks topic mood --trials 3

No number in the output is typed by hand.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

# Before torch: importing common puts the checkout on sys.path and Hugging Face offline.
from common import (RESULTS_DIR, ROOT, cpu_line, display_path, publish, setup_logging, utc_stamp,
                    versions_line)

import torch
from torch import nn

from merging_core.config import EvalSubsetConfig, parse_merge_config
from merging_core.evaluation.evaluate import EvalSession
from merging_core.search import Trial, run_sweep
from merging_core.evaluation.workspace import load_workspace

# The tokenizers library reads this when it tokenises, not at import, so here is in time.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_WORKSPACE = ROOT / "workspaces" / "demo" / "workspace.yaml"
DEVICE = torch.device("cpu")  # --device; both sides use it
WARMUP_LAMBDA = 0.5
OVERHEAD_GOAL = 0.10  # our overhead / our trial time
SPEEDUP_GOAL = 5.0  # our trials per hour / the baseline's

log = logging.getLogger("sweep_bench")


# --------------------------------------------------------------------------------- timing


def synchronize() -> None:
    """Wait for queued CUDA kernels, so wall clocks time the work itself."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


class ForwardTimer:
    """Accumulates the wall time spent inside wrapped `forward` calls."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, module: nn.Module) -> None:
        """Time `module.forward` (an instance attribute shadows the class method; no-grad and
        inference-mode contexts of the caller apply unchanged)."""
        original = module.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize()
                self.seconds += time.perf_counter() - start
                self.calls += 1

        module.forward = timed  # type: ignore[method-assign]


@dataclass
class TrialTiming:
    lam: float
    wall_s: float
    forward_s: float
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.forward_s


@dataclass
class SideResult:
    """One side of the comparison: its measured trials and one-time costs."""

    name: str
    trials: list[TrialTiming]
    one_time: dict[str, float]
    total_wall_s: float  # all measured trials, start to end (ours: incl. sweep start/finish)
    total_forward_s: float

    @property
    def wall(self) -> float:
        return self.total_wall_s / len(self.trials)

    @property
    def forward(self) -> float:
        return self.total_forward_s / len(self.trials)

    @property
    def overhead(self) -> float:
        return self.wall - self.forward

    @property
    def overhead_share(self) -> float:
        return self.overhead / self.wall

    @property
    def per_hour(self) -> float:
        return 3600.0 / self.wall


# --------------------------------------------------------------------------------- merges


def merge_lambda(lam: float, n_adapters: int) -> float | list[float]:
    """The swept value: weighted_delta's scalar (lambda, 1 - lambda) with 2 adapters, else
    weights [lambda, (1 - lambda)/(n-1), ...]."""
    if n_adapters == 2:
        return lam
    return [lam] + [(1.0 - lam) / (n_adapters - 1)] * (n_adapters - 1)


def merge_weights(lam: float, n_adapters: int) -> list[float]:
    value = merge_lambda(lam, n_adapters)
    return [value, 1.0 - value] if isinstance(value, float) else list(value)


def default_lambdas(n: int) -> list[float]:
    if n == 1:
        return [0.3]
    return [round(0.15 + 0.7 * i / (n - 1), 4) for i in range(n)]


# ------------------------------------------------------------------------------------ ours


def sweep_config(tasks: Sequence[str], lambdas: Sequence[float], split: str,
                 subset: EvalSubsetConfig) -> dict[str, Any]:
    return {
        "adapters": list(tasks), "method": "weighted_delta", "split": split,
        "eval_subset": subset.model_dump(),
        "search": {"type": "grid", "grid": {"lambda": [merge_lambda(x, len(tasks)) for x in lambdas]}},
    }


def timed_sweep(session: EvalSession, timer: ForwardTimer, tasks: Sequence[str],
                lambdas: Sequence[float], split: str,
                subset: EvalSubsetConfig) -> tuple[list[TrialTiming], float, float]:
    """Run one grid sweep; per trial the wall time between consecutive finished trials (the
    first from the sweep's start) and the forward time in it. Returns (trials, total wall,
    total forward), the totals including the sweep's start (validation) and finish (summary,
    plot)."""
    config = parse_merge_config(sweep_config(tasks, lambdas, split, subset))
    marks: list[tuple[float, float, Trial]] = []

    def on_trial(trial: Trial) -> None:
        marks.append((time.perf_counter(), timer.seconds, trial))

    start, forward_start = time.perf_counter(), timer.seconds
    result = run_sweep(config, session, on_trial=on_trial)
    end, forward_end = time.perf_counter(), timer.seconds
    if result.resumed_trials:
        raise RuntimeError("the sweep resumed earlier trials; use a fresh artifacts dir")
    trials = []
    previous, previous_forward = start, forward_start
    for (at, forward, trial), lam in zip(marks, lambdas):
        trials.append(TrialTiming(lam, at - previous, forward - previous_forward, dict(trial.metrics)))
        previous, previous_forward = at, forward
    return trials, end - start, forward_end - forward_start


def run_ours(workspace_path: Path, tasks: Sequence[str], lambdas: Sequence[float], split: str,
             subset: EvalSubsetConfig, artifacts: Path) -> tuple[SideResult, EvalSession]:
    timer = ForwardTimer()
    started = time.perf_counter()
    session = EvalSession.from_workspace(load_workspace(workspace_path), artifacts, device=str(DEVICE))
    load_s = time.perf_counter() - started
    timer.wrap(session.holder.model)
    log.info("ours: model loaded in %.2f s; warm-up sweep", load_s)
    _, warm_s, warm_forward = timed_sweep(session, timer, tasks, [WARMUP_LAMBDA], split, subset)
    log.info("ours: warm-up %.2f s (%.2f s forward); %d measured trials", warm_s, warm_forward, len(lambdas))
    trials, total, forward = timed_sweep(session, timer, tasks, lambdas, split, subset)
    for trial in trials:
        log.info("ours: lambda=%g wall %.3f s forward %.3f s", trial.lam, trial.wall_s, trial.forward_s)
    one_time = {"load": load_s, "warmup": warm_s, "warmup_forward": warm_forward,
                "sweep_finish": total - sum(t.wall_s for t in trials)}
    return SideResult("ours", trials, one_time, total, forward), session


# -------------------------------------------------------------------------------- baseline


@dataclass
class EvalSet:
    """One task's eval subset as a script would hold it: texts, gold label ids, settings."""

    texts: list[str]
    gold: list[int]
    batch_size: int
    max_length: int


def eval_sets(session: EvalSession, tasks: Sequence[str], split: str,
              subset: EvalSubsetConfig) -> dict[str, EvalSet]:
    sets = {}
    for task in tasks:
        data, _ = session.task_data(task, split, subset)
        labels = session.labels(task)
        config = session.workspace.task(task)
        assert data.labels is not None
        sets[task] = EvalSet(list(data.texts), [labels.index(y) for y in data.labels],
                             config.batch_size, config.max_length)
    return sets


def script_accuracy(model: nn.Module, tokenizer: Any, data: EvalSet) -> float:
    """A plain evaluation loop, batched in length order like ours (same forward work)."""
    order = sorted(range(len(data.texts)), key=lambda i: len(data.texts[i]))
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(order), data.batch_size):
            batch = order[start : start + data.batch_size]
            encoded = tokenizer([data.texts[i] for i in batch], padding=True, truncation=True,
                                max_length=data.max_length, return_tensors="pt").to(DEVICE)
            predicted = model(**encoded).logits.argmax(dim=-1).tolist()
            correct += sum(int(p == data.gold[i]) for p, i in zip(predicted, batch))
    return correct / len(order)


def install_head(model: nn.Module, head: dict[str, torch.Tensor]) -> None:
    """Replace the classifier module(s) named in an adapter file by the task's own head."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in head.items():
        module, _, attribute = key.rpartition(".")
        by_module.setdefault(module, {})[attribute] = tensor
    for module_name, tensors in by_module.items():
        weight, bias = tensors["weight"], tensors.get("bias")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear.eval())


def read_head(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The non-LoRA tensors of a PEFT adapter file (its modules_to_save head), keyed like the
    base model's parameters."""
    from safetensors.torch import load_file

    head = {}
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        if "lora_" in key:
            continue
        short = key.removeprefix("base_model.model.")
        parts = short.split(".")
        if "modules_to_save" in parts:
            index = parts.index("modules_to_save")
            parts = parts[:index] + parts[index + 2 :]
        head[".".join(parts)] = tensor
    return head


def baseline_trial(base_path: Path, adapters: dict[str, Path], weights: Sequence[float],
                   sets: dict[str, EvalSet], timer: ForwardTimer) -> dict[str, float]:
    """Everything a reload-per-trial script does for one merge; returns each task's accuracy."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForSequenceClassification.from_pretrained(base_path).to(DEVICE)
    base.eval()
    timer.wrap(base)
    model: Any = None
    heads = {}
    for name, directory in adapters.items():
        config = LoraConfig.from_pretrained(str(directory))
        config.modules_to_save = None  # PEFT cannot add_weighted_adapter over saved heads
        config.task_type = None  # nor wrap heads of different sizes on one base
        if model is None:
            model = PeftModel.from_pretrained(base, str(directory), adapter_name=name, config=config,
                                              ignore_mismatched_sizes=True)
        else:
            model.add_adapter(name, config)
            model.load_adapter(str(directory), adapter_name=name, ignore_mismatched_sizes=True)
        heads[name] = read_head(directory)
    model.add_weighted_adapter(list(adapters), list(weights), "merged", combination_type="cat")
    model.set_adapter("merged")
    model.eval()
    accuracy = {}
    for task, data in sets.items():
        install_head(base, {k: v.to(DEVICE) for k, v in heads[task].items()})
        accuracy[task] = script_accuracy(model, tokenizer, data)
    del model, base, heads, tokenizer
    gc.collect()
    return accuracy


def run_baseline(session: EvalSession, tasks: Sequence[str], lambdas: Sequence[float],
                 split: str, subset: EvalSubsetConfig) -> SideResult:
    base_path = session.workspace.base_model_path()
    adapters = {task: session.workspace.adapter_path(task) for task in tasks}
    sets = eval_sets(session, tasks, split, subset)
    timer = ForwardTimer()

    def one(lam: float) -> TrialTiming:
        forward, start = timer.seconds, time.perf_counter()
        accuracy = baseline_trial(base_path, adapters, merge_weights(lam, len(tasks)), sets, timer)
        return TrialTiming(lam, time.perf_counter() - start, timer.seconds - forward, accuracy)

    warm = one(WARMUP_LAMBDA)
    log.info("baseline: warm-up %.2f s (%.2f s forward)", warm.wall_s, warm.forward_s)
    trials = []
    for lam in lambdas:
        trials.append(one(lam))
        log.info("baseline: lambda=%g wall %.3f s forward %.3f s", lam, trials[-1].wall_s, trials[-1].forward_s)
    return SideResult("baseline", trials, {"warmup": warm.wall_s, "warmup_forward": warm.forward_s},
                      sum(t.wall_s for t in trials), sum(t.forward_s for t in trials))


# ---------------------------------------------------------------------------------- report


def table(ours: SideResult, base: SideResult) -> list[str]:
    def row(label: str, value: Callable[[SideResult], float], fmt: str, higher_is_better: bool = False) -> str:
        a, b = value(ours), value(base)
        ratio = (a / b if b else float("nan")) if higher_is_better else (b / a if a else float("nan"))
        return f"| {label} | {a:{fmt}} | {b:{fmt}} | {ratio:.2f}x |"

    return [
        "| per trial | ours (EvalSession sweep) | baseline (reload + PEFT per trial) "
        "| ours better by (baseline/ours; trials/h: ours/baseline) |",
        "|---|---:|---:|---:|",
        row("wall time, mean (s)", lambda s: s.wall, ".3f"),
        row("forward passes (s)", lambda s: s.forward, ".3f"),
        row("overhead = wall - forward (s)", lambda s: s.overhead, ".3f"),
        row("overhead, % of trial", lambda s: 100 * s.overhead_share, ".1f"),
        row("trials per hour", lambda s: s.per_hour, ",.0f", higher_is_better=True),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=DEMO_WORKSPACE, help="workspace.yaml")
    parser.add_argument("--tasks", nargs="+", default=["intent", "sentiment"], help="adapters = eval tasks")
    parser.add_argument("--trials", type=int, default=8, help="measured trials per side")
    parser.add_argument("--samples", type=int, default=200, help="stratified eval samples per task")
    parser.add_argument("--split", default="test")
    parser.add_argument("--artifacts", type=Path, default=None, help="artifacts dir (default: a new temp dir)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (both sides)")
    parser.add_argument("--write", action="store_true",
                        help="write bench/results/sweep_bench_<cpu|cuda>.md")
    args = parser.parse_args()
    setup_logging(quiet_libraries=True)
    torch.manual_seed(0)
    global DEVICE
    DEVICE = torch.device(args.device)
    results = RESULTS_DIR / f"sweep_bench_{DEVICE.type}.md"

    lambdas = default_lambdas(args.trials)
    subset = EvalSubsetConfig(max_samples=args.samples, stratified=True, seed=0)
    artifacts = args.artifacts or Path(mkdtemp(prefix="sweep_bench_"))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    ours, session = run_ours(args.workspace, args.tasks, lambdas, args.split, subset, artifacts)
    base = run_baseline(session, args.tasks, lambdas, args.split, subset)
    minutes = (time.perf_counter() - started) / 60

    sizes = {t: len(session.task_data(t, args.split, subset)[0]) for t in args.tasks}
    agreement = max(abs(o.accuracy[t] - b.accuracy[t])
                    for o, b in zip(ours.trials, base.trials) for t in args.tasks)
    equal_forward = ours.forward + base.overhead
    overhead_ok = ours.overhead_share < OVERHEAD_GOAL
    speedup = ours.per_hour / base.per_hour
    speed_ok = speedup >= SPEEDUP_GOAL
    lines = [
        f"## Sweep trial overhead: EvalSession sweep vs reload-per-trial PEFT script ({DEVICE.type.upper()})",
        "",
        *([f"GPU: {torch.cuda.get_device_name(DEVICE)}."] if DEVICE.type == "cuda" else []),
        f"{cpu_line(load_before)}; {versions_line('torch', 'transformers', 'peft')}; generated "
        f"{utc_stamp()} UTC by `bench/sweep_bench.py`.",
        f"Workspace `{display_path(args.workspace)}`, adapters/eval tasks {', '.join(args.tasks)}, "
        f"weighted_delta, split `{args.split}`, stratified subset per task: "
        + ", ".join(f"{t} {n}" for t, n in sizes.items())
        + f"; {len(lambdas)} measured trials per side, lambda in "
        f"[{', '.join(f'{x:g}' for x in lambdas)}]; total {minutes:.1f} min.",
        "",
        *table(ours, base),
        "",
        f"- One-time, not in the table: ours: base model load {ours.one_time['load']:.2f} s, warm-up "
        f"trial {ours.one_time['warmup']:.2f} s (adapters, data, the cached reference and base "
        f"metrics; {ours.one_time['warmup_forward']:.2f} s of it forward); baseline: warm-up trial "
        f"{base.one_time['warmup']:.2f} s.",
        f"- Ours includes the sweep's start (grid validation) and finish (summary, plot): "
        f"{ours.one_time['sweep_finish']:.3f} s for the finish, spread over the trials.",
        f"- Trial walls (s), ours: {', '.join(f'{t.wall_s:.3f}' for t in ours.trials)}; "
        f"baseline: {', '.join(f'{t.wall_s:.3f}' for t in base.trials)} "
        f"(median {statistics.median(t.wall_s for t in ours.trials):.3f} vs "
        f"{statistics.median(t.wall_s for t in base.trials):.3f}).",
        f"- Same merges on both sides: the largest accuracy difference over all trials and tasks "
        f"is {agreement:.4f}. The baseline's forward passes run PEFT's unmerged LoRA branches; "
        f"with the same forward cost as ours its trial would take {equal_forward:.3f} s, i.e. ours "
        f"would be {equal_forward / ours.wall:.2f}x faster: skipping reloads saves at most the "
        f"baseline's overhead, which is small next to the forward passes here.",
        "",
        f"- Goal: our overhead < {OVERHEAD_GOAL:.0%} of trial time: "
        f"{100 * ours.overhead_share:.1f}% -> **{'PASS' if overhead_ok else 'FAIL'}**",
        f"- Goal: our trials/hour >= {SPEEDUP_GOAL:g}x the baseline's: {speedup:.2f}x -> "
        f"**{'PASS' if speed_ok else 'FAIL'}**",
        f"- Ceiling on that ratio here, with zero overhead on our side: baseline trial / our "
        f"forward passes = {base.wall / ours.forward:.2f}x. Forward passes are "
        f"{100 * ours.forward / ours.wall:.0f}% of our trial, so no bookkeeping saving reaches "
        f"{SPEEDUP_GOAL:g}x. It can only grow where a reload is dear next to the forward passes, "
        f"e.g. on a GPU, where forward passes are fast and loading from disk is not "
        f"(`--device cuda`).",
    ]
    publish("\n".join(lines), results if args.write else None)
    if args.write:
        print(f"\nwritten to {display_path(results)}")


if __name__ == "__main__":
    main()
