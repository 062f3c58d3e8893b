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


def elect_positive(kept: Sequence[torch.Tensor], method: Consensus = "total") -> torch.Tensor:
    """Where the elected sign is + (True) or - (False); ties (a zero sum) elect +, as in peft."""
    if method == "total":
        elected_from = kept[0].clone()
        for delta in kept[1:]:
            elected_from.add_(delta)
    elif method == "frequency":
        elected_from = kept[0].sign()
        for delta in kept[1:]:
            elected_from.add_(delta.sign())
    else:
        raise ValueError(f"consensus must be 'total' or 'frequency', got {method!r}")
    return elected_from >= 0


def disjoint_mean(
    kept: list[torch.Tensor],
    weights: Sequence[float],
    positive: torch.Tensor,
    owned: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Weighted mean over the entries whose sign agrees with the elected one (zeros never count).

    Accumulated one adapter at a time with a bool sign and a uint8 count, so the extra memory
    is about one dense delta, not a stack of them. It consumes `kept`: each entry is released
    (set to None) once accumulated. Tensors marked `owned` (not the caller's) are masked in place.
    """
    total: torch.Tensor | None = None
    count = torch.zeros(kept[0].shape, dtype=torch.uint8, device=kept[0].device)
    for index, weight in enumerate(weights):
        delta = kept[index]
        kept[index] = None  # type: ignore[call-overload]
        agree = torch.where(positive, delta > 0, delta < 0)
        mine = owned is not None and owned[index]
        masked = delta.mul_(agree) if mine else delta * agree
        if total is None:
            total = masked.mul_(weight)  # masked is ours either way: reuse it as the sum
        else:
            total.add_(masked, alpha=weight)
        count.add_(agree)
        del delta, agree, masked
    assert total is not None
    return total.div_(count.clamp_(min=1))


def generalized_task_arithmetic(
    deltas: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    sparsify: Sparsifier | None = None,
    consensus: Consensus | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Merge dense deltas; `sparsify(delta, adapter_index)` runs per source adapter.

    `deltas` is read once per adapter, in order (it may compute each delta on access).
    """
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(weights)} weights for {len(deltas)} deltas")
    if len(deltas) > 255:
        raise ValueError("at most 255 adapters can be merged at once")
    kept, owned = [], []
    for index in range(len(deltas)):
        source = deltas[index]
        result = sparsify(source, index) if sparsify else source
        kept.append(result)
        owned.append(result is not source)  # a sparsifier's output is a new tensor: ours
        del source, result
    if consensus is None:
        merged = kept[0] * weights[0]
        for delta, weight in zip(kept[1:], weights[1:]):
            merged.add_(delta, alpha=weight)
    else:
        positive = elect_positive(kept, consensus)
        merged = disjoint_mean(kept, weights, positive, owned)
    return merged.mul_(scale) if scale != 1.0 else merged
