"""DARE-TIES: DARE's random drop and rescale, then TIES sign election and disjoint mean.

Yu et al., ICML 2024 ("Language Models are Super Mario"), with Yadav et al., NeurIPS 2023
(TIES-Merging).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods import sparsify
from merging_core.methods.gta import generalized_task_arithmetic
from merging_core.methods.linear import per_adapter


def dare_ties(
    deltas: Sequence[torch.Tensor],
    *,
    density: float,
    lam: float | Sequence[float] = 1.0,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return generalized_task_arithmetic(
        deltas,
        weights=per_adapter(lam, len(deltas)),
        sparsify=lambda d, _: sparsify.random_drop(d, density, rescale=rescale, generator=generator),
        consensus="total",
    )
