"""Weighted merge in LoRA factor space: A = sum_i w_i A_i, B = sum_i w_i B_i (elementwise).

The seed framework's saveable method, equivalent to PEFT's `add_weighted_adapter(...,
combination_type="linear")` (Mangrulkar et al., PEFT). Note B @ A gains cross terms
w_i w_j B_i A_j, so this is not the weighted sum of deltas; `weighted_delta` is. Each
adapter's scaling is folded into its B, so the result has scaling 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods.linear import convex_pair


def weighted(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    lam: float | Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (B_i, A_i, scaling_i) triples of equal rank; returns (B, A) with scaling 1."""
    ranks = {a.shape[0] for _, a, _ in factors}
    if len(ranks) != 1:
        raise ValueError(f"weighted needs equal ranks in every module, got ranks {sorted(ranks)}")
    weights = convex_pair(lam, len(factors))
    lora_B = sum(w * s * b for w, (b, _, s) in zip(weights, factors))
    lora_A = sum(w * a for w, (_, a, _) in zip(weights, factors))
    return lora_B, lora_A
