"""RIA (Zhang et al., 2024): relative importance times activation norm. Pure tensor math.

S_ij = (|W_ij| / sum_i' |W_i'j| + |W_ij| / sum_j' |W_ij'|) * (||x_j||)^alpha, with alpha = 0.5 by default;
RIA compares scores over the whole matrix (one threshold per layer) unless asked per row.
"""

from __future__ import annotations

import torch

from ...patterns import Pattern, mask_from_scores


def ria_scores(weight: torch.Tensor, col_sq_mean: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    a = weight.detach().to(torch.float32).abs()
    tiny = torch.finfo(torch.float32).tiny
    relative = a / a.sum(dim=0, keepdim=True).clamp_min(tiny) + a / a.sum(dim=1, keepdim=True).clamp_min(tiny)
    return relative * col_sq_mean.to(torch.float32).sqrt().pow(alpha).unsqueeze(0)


def ria_prune_mask(weight: torch.Tensor, col_sq_mean: torch.Tensor, sparsity: float, pattern: Pattern,
                   alpha: float = 0.5, scope: str = "matrix") -> torch.Tensor:
    return mask_from_scores(ria_scores(weight, col_sq_mean, alpha), sparsity, pattern, scope=scope)
