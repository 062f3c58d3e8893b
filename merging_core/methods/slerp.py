"""SLERP of two task vectors: spherical interpolation along the great circle between them.

Shoemake, SIGGRAPH 1985, "Animating Rotation with Quaternion Curves", as applied to model
merging by mergekit (Goddard et al. 2024, "Arcee's MergeKit"). Nearly colinear deltas fall
back to linear interpolation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_COLINEAR = 1.0 - 1e-6


def slerp(deltas: Sequence[torch.Tensor], *, t: float = 0.5, eps: float = 1e-12) -> torch.Tensor:
    if len(deltas) != 2:
        raise ValueError(f"slerp merges exactly 2 deltas, got {len(deltas)}")
    first, second = deltas
    first_norm, second_norm = first.norm(), second.norm()
    if first_norm < eps or second_norm < eps:
        return (1 - t) * first + t * second
    cos_theta = torch.clamp((first * second).sum() / (first_norm * second_norm), -1.0, 1.0)
    if cos_theta.abs() > _COLINEAR:
        return (1 - t) * first + t * second
    theta = torch.arccos(cos_theta)
    sin_theta = torch.sin(theta)
    first_coef = torch.sin((1 - t) * theta) / sin_theta
    second_coef = torch.sin(t * theta) / sin_theta
    return first_coef * first + second_coef * second
