"""TIES-Merging: trim to the top-k% magnitudes, elect signs, disjoint mean, scale by lambda.

Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving Interference When Merging Models".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods import sparsify
from merging_core.methods.gta import generalized_task_arithmetic
from merging_core.methods.linear import per_adapter


def ties(
    deltas: Sequence[torch.Tensor], *, k: float = 20.0, lam: float | Sequence[float] = 1.0
) -> torch.Tensor:
    """`k` is the percent of entries kept per adapter; a list `lam` weights adapters."""
    scalar = isinstance(lam, (int, float))
    return generalized_task_arithmetic(
        deltas,
        weights=[1.0] * len(deltas) if scalar else per_adapter(lam, len(deltas)),
        sparsify=lambda d, _: sparsify.magnitude(d, k / 100.0),
        consensus="total",
        scale=float(lam) if scalar else 1.0,
    )
