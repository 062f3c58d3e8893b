"""Thin SVDs of products of LoRA factors, without forming the dense matrix.

For M = B @ A with B (out x r) and A (r x in): QR of B and of A^T, SVD of the small r x r core
R_B R_A^T, then rotate back. Cost O((out + in) r^2) instead of a dense SVD.
"""

from __future__ import annotations

import torch


def factored_svd(
    lora_B: torch.Tensor, lora_A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out x r), S (r), V (in x r) with B @ A == U diag(S) V^T."""
    q_b, r_b = torch.linalg.qr(lora_B)
    q_a, r_a = torch.linalg.qr(lora_A.T)
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u_core, s, q_a @ vh_core.T


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (P Q^T from the SVD P S Q^T)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh
