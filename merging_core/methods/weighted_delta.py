"""Weighted delta merge: sum_i w_i * delta_i on the dense deltas, exact.

The linear-combination form used throughout the merging literature (e.g. Wortsman et al.
2022, "Model soups"); with 2 adapters a scalar lambda means weights (lambda, 1 - lambda).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods.linear import convex_pair, linear_combination


def coefficients(lam: float | Sequence[float], n_adapters: int) -> list[float]:
    return convex_pair(lam, n_adapters)


def weighted_delta(deltas: Sequence[torch.Tensor], lam: float | Sequence[float]) -> torch.Tensor:
    """sum_i w_i * delta_i with w from lambda (scalar pair or per-adapter list)."""
    return linear_combination(deltas, coefficients(lam, len(deltas)))
