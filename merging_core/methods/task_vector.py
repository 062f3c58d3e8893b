"""Task arithmetic: lambda * sum_i delta_i (Ilharco et al. 2023, "Editing Models with Task
Arithmetic"). A list lambda gives one coefficient per adapter."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods.linear import linear_combination, per_adapter


def coefficients(lam: float | Sequence[float], n_adapters: int) -> list[float]:
    return per_adapter(lam, n_adapters)


def task_vector(deltas: Sequence[torch.Tensor], lam: float | Sequence[float]) -> torch.Tensor:
    """lambda * sum of deltas, or sum of lambda_i * delta_i."""
    return linear_combination(deltas, coefficients(lam, len(deltas)))
