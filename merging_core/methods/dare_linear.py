"""DARE-linear: random drop with rescale, then a weighted sum.

Yu et al., ICML 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods import sparsify
from merging_core.methods.gta import generalized_task_arithmetic
from merging_core.methods.linear import per_adapter


def dare_linear(
    deltas: Sequence[torch.Tensor],
    *,
    density: float,
    lam: float | Sequence[float] = 1.0,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adapters are dropped in order from one `generator`, so a seed fixes the result."""
    return generalized_task_arithmetic(
        deltas,
        weights=per_adapter(lam, len(deltas)),
        sparsify=lambda d, _: sparsify.random_drop(d, density, rescale=rescale, generator=generator),
    )
