"""TSV-Merge: Task Singular Vectors, decorrelated across tasks, then recombined.

Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model
Merging". Per module, each task delta's singular vectors are concatenated across tasks and
replaced by the nearest orthonormal set (whitening), which removes the overlap between tasks;
the merged delta is U_perp diag(S) V_perp^T, scaled by lambda. A LoRA delta of rank r has exactly
r singular components, so every component is kept (the paper's 1/T truncation of full-rank
deltas keeps at least this many), and the SVDs come from the factors, never a dense matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging_core.methods.lowrank import factored_svd, polar


def tsv(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]], *, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (B_i, A_i, scaling_i) triples; returns (B, A) of rank sum r_i, scaling 1."""
    us, ss, vs = [], [], []
    for lora_B, lora_A, scaling in factors:
        u, s, v = factored_svd(lora_B * scaling, lora_A)
        us.append(u)
        ss.append(s)
        vs.append(v)
    u_perp = polar(torch.cat(us, dim=1))
    v_perp = polar(torch.cat(vs, dim=1))
    singular = torch.cat(ss) * lam
    return u_perp * singular, v_perp.T.contiguous()
