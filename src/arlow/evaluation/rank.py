"""Effective rank of a set of features: how many directions the features really spread over.

``effective_rank(X) = exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j`` the normalised singular values of the
item-centred feature matrix and ``H`` the Shannon entropy (Roy & Vetterli, 2007; "RankMe", Garrido et al., 2023).
It is 1 when every item lies on one line through the mean, ``min(n, D)`` when the spectrum is flat. Centring
removes the direction shared by every item (a collapsed encoder often maps everything near one mean vector, which
would otherwise count as one more "used" direction).
"""

from __future__ import annotations

import torch

__all__ = ["effective_rank"]


@torch.no_grad()
def effective_rank(features: torch.Tensor, eps: float = 1e-12) -> float:
    """``features (n, D)`` -> effective rank in ``[1, min(n - 1, D)]`` (1.0 when all items are equal)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (n >= 2, D), got {tuple(features.shape)}")
    x = features.double()
    sigma = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    total = sigma.sum()
    if total <= eps * max(1.0, float(x.abs().max())):
        return 1.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
