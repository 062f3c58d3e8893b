"""Sparsifiers: the first stage of the generalized task-arithmetic pipeline.

Each takes one dense delta and returns a tensor of the same shape with entries dropped (and,
for the random ones, survivors rescaled so the expectation is unchanged).
"""

from __future__ import annotations

import torch


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the `int(density * numel)` largest-magnitude entries (TIES trim).

    Uses `kthvalue` for the threshold, which is several times faster than `topk` on large
    tensors; the kept set equals `topk`'s unless magnitudes tie exactly at the threshold.
    """
    _check_density(density)
    numel = delta.numel()
    keep = int(density * numel)
    if keep >= numel:
        return torch.ones_like(delta, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs()
    threshold = _kth_largest(magnitude.flatten(), keep)
    return magnitude >= threshold


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest value, without kthvalue's full copy of a large tensor.

    A strided sample bounds the threshold from below; kthvalue then runs on the (much
    smaller) candidates above that bound. Falls back to a full kthvalue if the bound is off.
    """
    numel = values.numel()
    if numel > 1_000_000:
        sample = values[:: numel // 65536].sort().values
        position = int((1.0 - k / numel - 0.01) * sample.numel())
        if position > 0:
            candidates = values[values >= sample[position]]
            if candidates.numel() >= k:
                return candidates.kthvalue(candidates.numel() - k + 1).values
    return values.kthvalue(numel - k + 1).values


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `density` fraction of entries by magnitude (Yadav et al. 2023, TIES trim).

    The |delta| buffer is reused for the result, so this costs one module-sized tensor.
    """
    _check_density(density)
    numel = delta.numel()
    keep = int(density * numel)
    if keep >= numel:
        return delta
    if keep <= 0:
        return torch.zeros_like(delta)
    buffer = delta.abs()
    keep_mask = buffer >= _kth_largest(buffer.flatten(), keep)
    return torch.where(keep_mask, delta, torch.zeros((), dtype=delta.dtype), out=buffer)


def random_drop(
    delta: torch.Tensor,
    density: float,
    *,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density, rescale survivors by 1/density.

    Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch". Seeded through `generator`.
    """
    _check_density(density)
    if density >= 1.0:
        return delta
    if density == 0.0:
        return torch.zeros_like(delta)
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    dropped = delta * keep
    return dropped / density if rescale else dropped


def breadcrumbs(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top `gamma` fraction (outliers) and keep the next `density`.

    Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
    Masks".
    """
    _check_density(density)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    numel = delta.numel()
    n_top = int(gamma * numel)
    n_keep = min(int(density * numel), numel - n_top)
    order = delta.abs().flatten().argsort(descending=True)
    mask = torch.zeros(numel, dtype=torch.bool, device=delta.device)
    mask[order[n_top : n_top + n_keep]] = True
    return delta * mask.view_as(delta)


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA's MagPrune: keep probabilities rise linearly with magnitude rank.

    Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling". Keep probability runs from density - epsilon/2 (smallest) to
    density + epsilon/2 (largest); survivors are rescaled by 1/p.
    """
    _check_density(density)
    if epsilon < 0 or density - epsilon / 2 <= 0 or density + epsilon / 2 > 1:
        raise ValueError(
            f"epsilon={epsilon} with density={density} gives keep probabilities outside (0, 1]"
        )
    numel = delta.numel()
    ranks = torch.empty(numel, device=delta.device, dtype=delta.dtype)
    order = delta.abs().flatten().argsort()
    ranks[order] = torch.arange(numel, device=delta.device, dtype=delta.dtype)
    span = max(numel - 1, 1)
    keep_prob = (density - epsilon / 2 + epsilon * ranks / span).view_as(delta)
    keep = torch.bernoulli(keep_prob, generator=generator)
    dropped = delta * keep
    return dropped / keep_prob if rescale else dropped
