"""Save a merge as a PEFT LoRA adapter (`adapter_model.safetensors` + `adapter_config.json`).

- Linear results (uniform, task_vector, weighted_delta) are exact as a concatenated LoRA:
  B = [c_1 s_1 B_1 | ... | c_n s_n B_n], A = [A_1; ...; A_n], rank = sum of ranks.
- Factor-space results (`weighted`, `tsv`, `knots`, `regmean`) are saved as they are, at their
  own rank, exactly.
- Nonlinear results are factored by a truncated SVD at `save_rank`; the relative Frobenius
  reconstruction error of each module is measured and recorded.
Every saved module has scaling 1 (lora_alpha == rank), which keeps rsLoRA and per-module
alphas of the sources out of the saved config.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from merging_core.adapters.loading import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE
from merging_core.engine.merge import MergeOutput, ModuleMerge
from merging_core.runtime.cancel import Progress, report
from merging_core.runtime.io import (
    StreamingSafetensorsWriter,
    atomic_save_safetensors,
    atomic_write_json,
)
from merging_core.runtime.paths import head_file

log = logging.getLogger(__name__)

# Below this many columns (or with a rank close to full) an exact SVD is cheap and exact.
_EXACT_SVD_MAX_DIM = 512


def _randomized_svd(
    matrix: torch.Tensor, rank: int, *, oversample: int = 16, niter: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of a wide matrix (rows <= columns) by subspace iteration.

    Halko, Martinsson & Tropp 2011. Written out because `torch.svd_lowrank` spent seconds per
    2048x5632 module on 2 cores in QR and SVD of its tall n x q factors; here the only QR is of
    the short side (rows x q), and the final SVD comes from the q x q Gram matrix in float64.
    Seeded, so a save is reproducible.
    """
    rows, cols = matrix.shape
    width = min(rank + oversample, rows)
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    probe = torch.randn(cols, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix @ (matrix.T @ basis)).Q
    projected = basis.T @ matrix  # width x cols
    eigenvalues, eigenvectors = torch.linalg.eigh((projected @ projected.T).double())
    order = eigenvalues.argsort(descending=True)[:rank]
    singular = eigenvalues[order].clamp(min=0).sqrt()
    left_small = eigenvectors[:, order]
    safe = torch.where(singular > 0, singular, torch.ones_like(singular))
    right = (projected.T.double() @ left_small) / safe
    left = basis @ left_small.to(matrix.dtype)
    return left, singular.to(matrix.dtype), right.to(matrix.dtype)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors (B, A) of `delta` and the measured relative reconstruction error.

    Small matrices (or ranks near full) get an exact SVD; large ones a randomized subspace
    iteration, whose error is measured exactly, not assumed.
    """
    matrix = delta.float()
    smallest = min(matrix.shape)
    rank = min(rank, smallest)
    if smallest <= _EXACT_SVD_MAX_DIM or rank * 2 >= smallest:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    elif matrix.shape[0] <= matrix.shape[1]:
        u, s, v = _randomized_svd(matrix, rank)
    else:
        v, s, u = _randomized_svd(matrix.T, rank)
    root = s.sqrt()
    lora_B = (u * root).contiguous()
    lora_A = (v * root).T.contiguous()
    return lora_B, lora_A, relative_error(matrix, lora_B, lora_A)


def relative_error(matrix: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor) -> float:
    """||matrix - B A||_F / ||matrix||_F, measured exactly, a block of rows at a time."""
    norm = float(matrix.norm())
    if norm == 0:
        return 0.0
    squared = 0.0
    for start in range(0, matrix.shape[0], 256):
        block = matrix[start : start + 256] - lora_B[start : start + 256] @ lora_A
        squared += float(block.square().sum())
    return squared**0.5 / norm


def save_linear(merged: ModuleMerge, save_rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact concatenation when the result is a linear combination; SVD otherwise."""
    if merged.coefficients is None:
        return save_svd(merged, save_rank)
    lora_B = torch.cat(
        [c * s.scaling * s.lora_B for c, s in zip(merged.coefficients, merged.sources)], dim=1
    )
    lora_A = torch.cat([s.lora_A for s in merged.sources], dim=0)
    return lora_B, lora_A, 0.0


def save_factors(merged: ModuleMerge, save_rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factor-space results (and RegMean's) are already a LoRA at their own rank."""
    assert merged.factors is not None
    lora_B, lora_A = merged.factors
    return lora_B, lora_A, 0.0


def save_svd(merged: ModuleMerge, save_rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    return low_rank(merged.dense(), save_rank)


def save_merged_adapter(
    output: MergeOutput,
    out_dir: Path,
    *,
    save_rank: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the merged adapter into `out_dir`; return a report for the run metadata."""
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    total = len(output.modules)
    # Each module's factors go to disk as they are made: a large save never holds them all.
    writer = StreamingSafetensorsWriter(out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    try:
        for done, module in enumerate(output.modules, start=1):
            planned = output.plan_module(module) if output.exact_linear else output.merge_module(module)
            lora_B, lora_A, error = output.method.save_fn(planned, save_rank)
            writer.add(f"{PEFT_PREFIX}{module}.lora_A.weight", lora_A)
            writer.add(f"{PEFT_PREFIX}{module}.lora_B.weight", lora_B)
            ranks[module] = int(lora_A.shape[0])
            errors[module] = error
            del planned, lora_B, lora_A
            report(progress, done, total, f"saved {module}")
        writer.close()
    except BaseException:
        writer.abort()
        raise

    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {module: r for module, r in ranks.items() if r != rank}
    first = output.adapters[0].config
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(output.modules),
        fan_in_fan_out=bool(first.get("fan_in_fan_out", False)),
        bias="none",
        init_lora_weights=True,
        task_type=first.get("task_type"),
        base_model_name_or_path=first.get("base_model_name_or_path"),
    )
    config_dict = config.to_dict()
    config_dict["peft_type"] = "LORA"
    config_dict["target_modules"] = sorted(output.modules)
    atomic_write_json(out_dir / CONFIG_FILE, config_dict)
    for adapter_name, heads in output.heads.items():
        atomic_save_safetensors(heads, head_file(out_dir, adapter_name))

    relative_errors = list(errors.values())
    return {
        "rank": rank,
        "rank_pattern": pattern,
        "save_rank": save_rank,
        "exact": all(e == 0.0 for e in relative_errors),
        "svd_relative_error_max": max(relative_errors),
        "svd_relative_error_mean": sum(relative_errors) / len(relative_errors),
        "svd_relative_error": errors,
        "heads": {name: head_file(Path(), name).as_posix() for name in output.heads},
    }
