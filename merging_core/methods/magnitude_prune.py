"""Magnitude prune: keep the top `density` magnitudes per adapter, then a weighted sum.

The TIES trim step without sign election (as `magnitude_prune` in PEFT's merge_utils; Yadav
et al., NeurIPS 2023).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods import sparsify
from merging_core.methods.gta import generalized_task_arithmetic
from merging_core.methods.linear import per_adapter


def magnitude_prune(
    deltas: Sequence[torch.Tensor], *, density: float, lam: float | Sequence[float] = 1.0
) -> torch.Tensor:
    return generalized_task_arithmetic(
        deltas,
        weights=per_adapter(lam, len(deltas)),
        sparsify=lambda d, _: sparsify.magnitude(d, density),
    )
