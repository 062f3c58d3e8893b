"""Shared helpers for the linear methods (uniform, task_vector, weighted_delta)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def linear_combination(deltas: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """sum_i c_i * delta_i, accumulated in place (no stacked copy of every delta)."""
    if len(coefficients) != len(deltas):
        raise ValueError(f"got {len(coefficients)} coefficients for {len(deltas)} deltas")
    merged = deltas[0] * coefficients[0]
    for index in range(1, len(deltas)):
        merged.add_(deltas[index], alpha=coefficients[index])
    return merged


def per_adapter(lam: float | Sequence[float], n_adapters: int, name: str = "lambda") -> list[float]:
    """A scalar lambda scales every adapter; a list gives one weight per adapter (`name`: the
    parameter an error names)."""
    if isinstance(lam, (int, float)):
        return [float(lam)] * n_adapters
    if len(lam) != n_adapters:
        raise ValueError(f"{name} has {len(lam)} values for {n_adapters} adapters")
    return [float(x) for x in lam]


def convex_pair(lam: float | Sequence[float], n_adapters: int) -> list[float]:
    """The seed's `weighted` semantics: scalar with 2 adapters -> (lambda, 1 - lambda)."""
    if isinstance(lam, (int, float)):
        if n_adapters != 2:
            raise ValueError(
                f"a scalar lambda means (lambda, 1 - lambda) and needs exactly 2 adapters; "
                f"give a list of {n_adapters} weights instead"
            )
        return [float(lam), 1.0 - float(lam)]
    return per_adapter(lam, n_adapters)
