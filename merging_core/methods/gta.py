"""Generalized task arithmetic: sparsify -> weight -> sign consensus -> combine -> scale.

Task arithmetic, TIES, DARE, magnitude prune, breadcrumbs and DELLA are all this one pipeline
with different settings (as in mergekit's generalized task arithmetic). The sign is elected on
the sparsified, unweighted deltas and the disjoint mean divides by the number of entries that
agree with it, as in `peft.utils.merge_utils`, so results match peft numerically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

Sparsifier = Callable[[torch.Tensor, int], torch.Tensor]
Consensus = Literal["total", "frequency"]


def majority_sign_mask(stacked: torch.Tensor, method: Consensus = "total") -> torch.Tensor:
    """Mask of entries whose sign agrees with the elected sign (stacked on dim 0)."""
    signs = stacked.sign()
    if method == "total":
        elected_from = stacked.sum(dim=0)
    elif method == "frequency":
        elected_from = signs.sum(dim=0)
    else:
        raise ValueError(f"consensus must be 'total' or 'frequency', got {method!r}")
    elected = torch.where(elected_from >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over the entries that agree with the elected sign (zeros never count)."""
    total = (weighted * agree).sum(dim=0)
    count = agree.sum(dim=0)
    return total / torch.clamp(count, min=1.0)


def generalized_task_arithmetic(
    deltas: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    sparsify: Sparsifier | None = None,
    consensus: Consensus | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Merge dense deltas; `sparsify(delta, adapter_index)` runs per source adapter."""
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(weights)} weights for {len(deltas)} deltas")
    kept = [sparsify(d, i) if sparsify else d for i, d in enumerate(deltas)]
    stacked = torch.stack(kept, dim=0)
    weight_column = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * weight_column.view(-1, *([1] * (stacked.dim() - 1)))
    if consensus is None:
        merged = weighted.sum(dim=0)
    else:
        merged = disjoint_mean(weighted, majority_sign_mask(stacked, consensus))
    return merged * scale if scale != 1.0 else merged
