"""Uniform merge: the plain mean of the deltas (Wortsman et al. 2022, "Model soups")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods.linear import linear_combination


def coefficients(n_adapters: int) -> list[float]:
    return [1.0 / n_adapters] * n_adapters


def uniform(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of the dense deltas."""
    return linear_combination(deltas, coefficients(len(deltas)))
