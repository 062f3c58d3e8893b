"""DELLA: magnitude-ranked random drop (MagPrune), sign election, disjoint mean.

Deep et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods import sparsify
from merging_core.methods.gta import generalized_task_arithmetic
from merging_core.methods.linear import per_adapter


def della(
    deltas: Sequence[torch.Tensor],
    *,
    density: float,
    epsilon: float,
    lam: float | Sequence[float] = 1.0,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return generalized_task_arithmetic(
        deltas,
        weights=per_adapter(lam, len(deltas)),
        sparsify=lambda d, _: sparsify.della_magprune(
            d, density, epsilon, rescale=rescale, generator=generator
        ),
        consensus="total",
    )
