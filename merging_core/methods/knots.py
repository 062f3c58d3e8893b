"""KnOTS: align LoRA updates in one shared SVD basis, then merge their task-specific parts.

Stoica et al., ICLR 2025, "Model merging with SVD to tie the KnOTS". Per module, the tasks'
deltas are concatenated side by side, [dW_1 ... dW_n] = U S [V_1^T ... V_n^T]; the
task-specific V_i^T blocks are merged with TIES (top-k% trim, sign election, disjoint mean) and
the result is U S V_merged^T, scaled by lambda. Because [dW_1 ... dW_n] = [B_1 ... B_n]
blockdiag(s_i A_i), the SVD is taken through a QR of the stacked B's: no dense SVD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods import sparsify
from merging_core.methods.gta import generalized_task_arithmetic


def knots(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    *,
    k: float = 20.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (B_i, A_i, scaling_i) triples; returns (B, A) of rank sum r_i, scaling 1."""
    q, r = torch.linalg.qr(torch.cat([b for b, _, _ in factors], dim=1))
    ranks = [a.shape[0] for _, a, _ in factors]
    blocks = []
    offset = 0
    for (_, lora_A, scaling), rank in zip(factors, ranks):
        blocks.append(r[:, offset : offset + rank] @ (lora_A * scaling))
        offset += rank
    u_core, s, vh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    in_features = factors[0][1].shape[1]
    task_parts = list(vh.split(in_features, dim=1))  # each (sum r) x in
    merged = generalized_task_arithmetic(
        task_parts,
        weights=[1.0] * len(task_parts),
        sparsify=lambda part, _: sparsify.magnitude(part, k / 100.0),
        consensus="total",
    )
    return (q @ u_core) * (s * lam), merged.contiguous()
