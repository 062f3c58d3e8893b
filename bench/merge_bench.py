"""Merge benchmark: our `task_vector` / `ties` against PEFT's `add_weighted_adapter`, on CPU.

Model: a Llama-layout model shaped like a 1B-parameter model (hidden 2048, intermediate 5632,
8 layers, small vocabulary), float32, with 3 LoRA adapters (r=16 on q, k, v, o, gate, up,
down; `init_lora_weights=False` so B is non-zero; a different seed each).

Cases (one row each, every case in its own fresh subprocess so its peak memory is its own):

- ours task_vector: a dense pass, `MergeOutput.iter_deltas()` over every module.
- ours task_vector save: `save_merged_adapter` (exact concatenation, rank 3 x 16).
- ours ties: a dense pass with k=20 (20% of the entries kept, as PEFT's density=0.2).
- ours ties save: `save_merged_adapter` at rank 64 (truncated SVD of each module).
- peft cat / ties_svd / dare_linear_svd: `PeftModel.add_weighted_adapter(..., combination_type=X)`
  with density=0.2 and svd_rank=64 where they apply (PEFT's other arguments at their defaults).

Seconds are wall-clock for the merge call only; loading the inputs is timed separately. Peak
memory is the process's peak resident set size during the merge minus its resident size just
before it (inputs loaded): for ours the baseline holds the 3 loaded adapters, for PEFT the base
model with the 3 adapters (PEFT needs the base model). Ratios and goals are computed from the
numbers measured in the same run.

Run from the repository root (CPU only; `make bench` runs the first line). PEFT's SVD cases
dominate the run time: on an idle 2-core machine the full size takes about 8 minutes (and
much longer, with erratic timings, when other processes compete for the cores; see the load
avg column).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/merge_bench.py          # print the table
    HF_HUB_OFFLINE=1 .venv/bin/python bench/merge_bench.py --write  # and write it to
                                                  # bench/results/merge_bench_cpu.md
    HF_HUB_OFFLINE=1 .venv/bin/python bench/merge_bench.py --quick  # 2 layers, a quick check
    HF_HUB_OFFLINE=1 .venv/bin/python bench/merge_bench.py --layers 4 \
        --cases ours_ties ours_ties_save peft_ties_svd

Options: `--threads N` sets torch's threads in every case (on a shared machine, 1 avoids
OpenMP threads waiting on a core another process holds); `--flush-denormal` turns on
`torch.set_flush_denormal` in every case (LAPACK's SVD in PEFT slows down a lot on subnormal
floats; the default leaves torch's default, as a PEFT user would run it).

Every case, ours and PEFT's, first calls `release_freed_memory_promptly()` (glibc mmap
threshold 1 MiB, as `lora-merge` and the service do), so freed large tensors go back to the
system at once and the peak RSS shows the merge's own working set, not blocks the allocator
kept for reuse.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Before torch: importing common puts the checkout on sys.path and Hugging Face offline.
from common import (
    MB,
    RESULTS_DIR,
    ROOT,
    cpu_name,
    display_path,
    measure_peak,
    publish,
    versions_line,
)

import torch
from merging_core.runtime.memory import release_freed_memory_promptly

RESULTS_FILE = RESULTS_DIR / "merge_bench_cpu.md"
RESULT_PREFIX = "MERGE_BENCH_RESULT "

HIDDEN = 2048
INTERMEDIATE = 5632
HEADS = 16
VOCAB = 1000
FULL_LAYERS = 8
QUICK_LAYERS = 2
LORA_RANK = 16
LORA_ALPHA = 32
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Not substrings of "lora_": PEFT warns that such names may be re-initialised on load.
ADAPTER_NAMES = ("task1", "task2", "task3")
ADAPTER_SEEDS = (1, 2, 3)
TIES_K = 20.0  # percent kept, ours
DENSITY = TIES_K / 100.0  # fraction kept, PEFT
SAVE_RANK = 64
REFERENCE_LAYERS = 2  # memory goal: dense deltas of this many layers + the adapters

GOAL_DENSE_SPEEDUP = 5.0
GOAL_SAVE_SPEEDUP = 3.0


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def model_config(layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    )


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=list(TARGET_MODULES),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )


def build_base_model(workdir: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    config = model_config_from(workdir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    model.requires_grad_(False)
    return model


def model_config_from(workdir: Path) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig.from_pretrained(workdir / "base_config")


def adapter_dirs(workdir: Path) -> list[Path]:
    return [workdir / "adapters" / name for name in ADAPTER_NAMES]


@dataclass
class Inputs:
    parameters: int  # base model parameters
    per_layer_dense_bytes: int  # float32 dense deltas of the target modules of one layer
    adapters_bytes: int  # all adapters' LoRA factors, float32
    modules: int  # target modules per adapter
    build_s: float


def build_inputs(workdir: Path, layers: int) -> Inputs:
    """Build the base model once, save its config and 3 seeded adapters under `workdir`."""
    from peft import get_peft_model

    started = time.perf_counter()
    model_config(layers).save_pretrained(workdir / "base_config")
    (workdir / "adapters").mkdir()
    base = build_base_model(workdir)
    parameters = sum(p.numel() for p in base.parameters())
    per_layer = sum(
        module.weight.numel() * 4
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear)
        and ".layers.0." in f".{name}."
        and name.rsplit(".", 1)[-1] in TARGET_MODULES
    )
    peft_model = None
    for adapter_name, seed, directory in zip(
        ADAPTER_NAMES, ADAPTER_SEEDS, adapter_dirs(workdir), strict=True
    ):
        torch.manual_seed(seed)
        if peft_model is None:
            peft_model = get_peft_model(base, lora_config(), adapter_name=adapter_name)
        else:
            peft_model.add_adapter(adapter_name, lora_config())
        peft_model.set_adapter(adapter_name)
        with tempfile.TemporaryDirectory(dir=workdir) as scratch:
            peft_model.save_pretrained(scratch, selected_adapters=[adapter_name])
            saved = Path(scratch) / adapter_name
            (saved if saved.is_dir() else Path(scratch)).rename(directory)
    assert peft_model is not None
    adapters_bytes = 0
    modules = 0
    from safetensors import safe_open

    for directory in adapter_dirs(workdir):
        with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                adapters_bytes += 4 * int(torch.Size(shape).numel())
                modules += key.endswith("lora_A.weight")
    del peft_model, base
    gc.collect()
    return Inputs(
        parameters=parameters,
        per_layer_dense_bytes=per_layer,
        adapters_bytes=adapters_bytes,
        modules=modules // len(ADAPTER_NAMES),
        build_s=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------
# Cases (each runs in its own subprocess)
# --------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: str
    load_s: float
    seconds: float
    cpu_s: float  # process CPU time (all threads) during the merge
    baseline_mb: float
    peak_added_mb: float
    memory_source: str
    load_average: float  # 1-minute system load average just before the merge
    note: str = ""


def _ours_spec(workdir: Path, method: str) -> dict[str, Any]:
    params: dict[str, Any] = {"lambda": 1.0}
    if method == "ties":
        params["k"] = TIES_K
    return {
        "adapters": [str(d) for d in adapter_dirs(workdir)],
        "method": method,
        "method_params": params,
    }


def _run_ours(workdir: Path, case: str, method: str, save: bool) -> CaseResult:
    from merging_core import prepare_merge
    from merging_core.engine.saving import save_merged_adapter

    started = time.perf_counter()
    output = prepare_merge(_ours_spec(workdir, method))
    load_s = time.perf_counter() - started
    note = f"{len(output.modules)} modules"
    report: dict[str, Any] | None = None
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=workdir) as out_dir:
        with measure_peak() as memory:
            started, cpu_started = time.perf_counter(), time.process_time()
            if save:
                report = save_merged_adapter(output, Path(out_dir), save_rank=SAVE_RANK)
            else:
                for _module, delta in output.iter_deltas():
                    del delta  # one dense module at a time, as a consumer would
            seconds = time.perf_counter() - started
            cpu_s = time.process_time() - cpu_started
    if report is not None:
        note += (
            f"; saved rank {report['rank']}, max relative SVD error "
            f"{report['svd_relative_error_max']:.3g}"
        )
    return CaseResult(
        case=case,
        load_s=load_s,
        seconds=seconds,
        cpu_s=cpu_s,
        baseline_mb=memory.baseline_bytes / MB,
        peak_added_mb=memory.added_bytes / MB,
        memory_source=memory.source,
        load_average=load_average,
        note=note,
    )


def _run_peft(workdir: Path, case: str, combination_type: str) -> CaseResult:
    from peft import PeftModel

    started = time.perf_counter()
    base = build_base_model(workdir)
    directories = adapter_dirs(workdir)
    model = PeftModel.from_pretrained(base, str(directories[0]), adapter_name=ADAPTER_NAMES[0])
    for name, directory in zip(ADAPTER_NAMES[1:], directories[1:], strict=True):
        model.load_adapter(str(directory), adapter_name=name)
    load_s = time.perf_counter() - started
    kwargs: dict[str, Any] = {}
    if combination_type != "cat":
        kwargs = {"density": DENSITY, "svd_rank": SAVE_RANK}
    torch.manual_seed(0)  # dare draws from the global generator
    load_average = os.getloadavg()[0]
    with torch.no_grad(), measure_peak() as memory:
        started, cpu_started = time.perf_counter(), time.process_time()
        model.add_weighted_adapter(
            list(ADAPTER_NAMES),
            [1.0] * len(ADAPTER_NAMES),
            "merged",
            combination_type=combination_type,
            **kwargs,
        )
        seconds = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
    rank = getattr(model.peft_config["merged"], "r", None)
    return CaseResult(
        case=case,
        load_s=load_s,
        seconds=seconds,
        cpu_s=cpu_s,
        baseline_mb=memory.baseline_bytes / MB,
        peak_added_mb=memory.added_bytes / MB,
        memory_source=memory.source,
        load_average=load_average,
        note=f"merged rank {rank}" + (f", density {DENSITY}" if "density" in kwargs else ""),
    )


CASES: dict[str, Callable[[Path, str], CaseResult]] = {
    "ours_task_vector": lambda w, c: _run_ours(w, c, "task_vector", save=False),
    "ours_task_vector_save": lambda w, c: _run_ours(w, c, "task_vector", save=True),
    "ours_ties": lambda w, c: _run_ours(w, c, "ties", save=False),
    "ours_ties_save": lambda w, c: _run_ours(w, c, "ties", save=True),
    "peft_cat": lambda w, c: _run_peft(w, c, "cat"),
    "peft_ties_svd": lambda w, c: _run_peft(w, c, "ties_svd"),
    "peft_dare_linear_svd": lambda w, c: _run_peft(w, c, "dare_linear_svd"),
}

LABELS = {
    "ours_task_vector": "ours `task_vector` (dense pass)",
    "ours_task_vector_save": "ours `task_vector` save (exact concat)",
    "ours_ties": f"ours `ties` (dense pass, k={TIES_K:g})",
    "ours_ties_save": f"ours `ties` save (rank {SAVE_RANK})",
    "peft_cat": "peft `cat`",
    "peft_ties_svd": f"peft `ties_svd` (density {DENSITY:g}, svd_rank {SAVE_RANK})",
    "peft_dare_linear_svd": f"peft `dare_linear_svd` (density {DENSITY:g}, svd_rank {SAVE_RANK})",
}


def run_case_in_subprocess(
    case: str, workdir: Path, threads: int | None, flush_denormal: bool
) -> CaseResult:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--case",
        case,
        "--workdir",
        str(workdir),
    ]
    if threads is not None:
        command += ["--threads", str(threads)]
    if flush_denormal:
        command.append("--flush-denormal")
    completed = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, env={**os.environ}
    )
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return CaseResult(**json.loads(line[len(RESULT_PREFIX) :]))
    raise RuntimeError(
        f"case {case} failed (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def header_lines(
    layers: int, inputs: Inputs, threads: int | None, flush_denormal: bool
) -> list[str]:
    torch_threads = threads if threads is not None else torch.get_num_threads()
    return [
        "# Merge benchmark (CPU, float32)",
        "",
        f"- Model: Llama layout, hidden {HIDDEN}, intermediate {INTERMEDIATE}, {layers} layers, "
        f"vocab {VOCAB}: {inputs.parameters / 1e6:.0f}M parameters, float32",
        f"- Adapters: {len(ADAPTER_NAMES)}, LoRA r={LORA_RANK} (alpha {LORA_ALPHA}) on "
        f"{', '.join(TARGET_MODULES)}: {inputs.modules} modules each, "
        f"{inputs.adapters_bytes / MB:.1f} MB in all",
        f"- {versions_line('torch', 'peft', 'transformers')}",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch_threads}, "
        f"flush denormals {'on' if flush_denormal else 'off (torch default)'}",
        "- peft's SVD variants call `torch.linalg.svd` (full_matrices=True, their default); "
        f"ours `ties` save uses `torch.svd_lowrank` at rank {SAVE_RANK} and measures its error.",
        "- Each case runs in a fresh subprocess; seconds time the merge call only (wall clock; "
        "CPU s: the process's CPU time over all threads; load s: loading its inputs). "
        "Peak MB added = peak RSS during the merge minus RSS just before it. Baseline for "
        "ours: the 3 loaded adapters; for peft: the base model + 3 adapters. "
        "Load avg: the 1-minute system load average before the merge (above the thread count, "
        "other processes competed for the cores).",
    ]


def _speedup(reference: CaseResult | None, ours: CaseResult | None) -> float | None:
    if reference is None or ours is None or ours.seconds <= 0:
        return None
    return reference.seconds / ours.seconds


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report_lines(results: Sequence[CaseResult], inputs: Inputs) -> list[str]:
    by_case = {r.case: r for r in results}
    lines = [
        "| case | seconds | CPU s | load s | peak MB added | baseline RSS MB | load avg | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results:
        lines.append(
            f"| {LABELS[row.case]} | {row.seconds:.2f} | {row.cpu_s:.1f} | {row.load_s:.1f} | "
            f"{row.peak_added_mb:.0f} | {row.baseline_mb:.0f} | {row.load_average:.1f} | "
            f"{row.note} |"
        )
    reference_dense = REFERENCE_LAYERS * inputs.per_layer_dense_bytes
    reference_bytes = reference_dense + inputs.adapters_bytes
    lines += ["", "## Goals (ratios from this run)", ""]
    peft_ties = by_case.get("peft_ties_svd")
    dense = _speedup(peft_ties, by_case.get("ours_ties"))
    save = _speedup(peft_ties, by_case.get("ours_ties_save"))
    if dense is not None:
        lines.append(
            f"- ties dense speedup vs peft ties_svd: {dense:.1f}x "
            f"(goal >= {GOAL_DENSE_SPEEDUP:g}x): {_verdict(dense >= GOAL_DENSE_SPEEDUP)}"
        )
    else:
        lines.append("- ties dense speedup vs peft ties_svd: not measured (case skipped)")
    if save is not None:
        lines.append(
            f"- ties save (rank {SAVE_RANK}) speedup vs peft ties_svd: {save:.1f}x "
            f"(goal >= {GOAL_SAVE_SPEEDUP:g}x): {_verdict(save >= GOAL_SAVE_SPEEDUP)}"
        )
    else:
        lines.append("- ties save speedup vs peft ties_svd: not measured (case skipped)")
    lines.append(
        f"- memory reference: dense deltas of {REFERENCE_LAYERS} layers "
        f"({REFERENCE_LAYERS} x {inputs.per_layer_dense_bytes / MB:.0f} MB = "
        f"{reference_dense / MB:.0f} MB) + adapters ({inputs.adapters_bytes / MB:.0f} MB) = "
        f"{reference_bytes / MB:.0f} MB"
    )
    for case in ("ours_ties", "ours_ties_save"):
        ties_row = by_case.get(case)
        if ties_row is None:
            continue
        # The adapters are in the baseline, so the merge's own peak is the added peak + adapters.
        peak = ties_row.peak_added_mb * MB + inputs.adapters_bytes
        lines.append(
            f"- {LABELS[case]} peak: {ties_row.peak_added_mb:.0f} MB added + adapters "
            f"{inputs.adapters_bytes / MB:.0f} MB = {peak / MB:.0f} MB "
            f"(goal < {reference_bytes / MB:.0f} MB): {_verdict(peak < reference_bytes)}"
        )
    sources = sorted({row.memory_source for row in results})
    lines += ["", f"Peak memory source: {', '.join(sources)}."]
    return lines


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=None, help=f"layers (default {FULL_LAYERS})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LAYERS} layers")
    parser.add_argument(
        "--cases", nargs="+", choices=list(CASES), default=list(CASES), help="cases to run"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help="torch.set_flush_denormal(True) in every case (LAPACK's SVD slows down on subnormals)",
    )
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS_FILE}")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # subprocess
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)  # subprocess
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    if args.case is not None:
        if args.workdir is None:
            raise SystemExit("--case needs --workdir")
        # The same allocator setting for every case, ours and peft's: freed large tensors go
        # back to the OS at once (what `lora-merge` and the service do at start-up).
        release_freed_memory_promptly()
        result = CASES[args.case](args.workdir, args.case)
        print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
        return 0

    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    layers = (
        args.layers if args.layers is not None else (QUICK_LAYERS if args.quick else FULL_LAYERS)
    )
    with tempfile.TemporaryDirectory(prefix="merge_bench_") as tmp:
        workdir = Path(tmp)
        print(
            f"building the model ({layers} layers) and {len(ADAPTER_NAMES)} adapters ...",
            file=sys.stderr,
            flush=True,
        )
        inputs = build_inputs(workdir, layers)
        print(f"inputs built in {inputs.build_s:.0f} s", file=sys.stderr, flush=True)
        results = []
        for case in args.cases:
            print(f"running {case} ...", file=sys.stderr, flush=True)
            result = run_case_in_subprocess(case, workdir, args.threads, args.flush_denormal)
            print(
                f"  {result.seconds:.2f} s, peak +{result.peak_added_mb:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
            results.append(result)
    header = header_lines(layers, inputs, args.threads, args.flush_denormal)
    text = "\n".join(header + [""] + report_lines(results, inputs))
    publish(text, RESULTS_FILE if args.write else None)
    if args.write:
        print(f"written to {display_path(RESULTS_FILE)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
