"""Model Breadcrumbs: drop the largest outliers and the small tail, then a weighted sum.

Davari & Belilovsky, ECCV 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods import sparsify
from merging_core.methods.gta import generalized_task_arithmetic
from merging_core.methods.linear import per_adapter


def breadcrumbs(
    deltas: Sequence[torch.Tensor],
    *,
    density: float,
    gamma: float,
    lam: float | Sequence[float] = 1.0,
) -> torch.Tensor:
    return generalized_task_arithmetic(
        deltas,
        weights=per_adapter(lam, len(deltas)),
        sparsify=lambda d, _: sparsify.breadcrumbs(d, density, gamma),
    )
