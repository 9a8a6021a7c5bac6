"""RIA (Zhang et al., 2024): relative importance times activation norm. Pure tensor math.

S_ij = (|W_ij| / sum_i' |W_i'j| + |W_ij| / sum_j' |W_ij'|) * (||x_j||)^alpha, with alpha = 0.5 by default;
RIA compares scores over the whole matrix (one threshold per layer) unless asked per row.
"""

from __future__ import annotations

import torch

from ...patterns import Pattern, mask_by_rows, mask_from_scores


def ria_scores(weight: torch.Tensor, col_sq_mean: torch.Tensor, alpha: float = 0.5, *, rows: slice = slice(None),
               col_sums: torch.Tensor | None = None) -> torch.Tensor:
    """RIA's scores of ``weight[rows]``; ``col_sums``: sum_i |W_ij| over the whole matrix ([1, in]), needed when
    ``rows`` is not every row (``column_sums``); the rows' own sums are within each row."""
    a = weight[rows].detach().to(torch.float32).abs()
    if col_sums is None:
        if a.shape[0] != weight.shape[0]:
            raise ValueError("ria_scores of some rows needs col_sums, the whole matrix's column sums (column_sums).")
        col_sums = a.sum(dim=0, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    relative = a / col_sums.clamp_min(tiny) + a / a.sum(dim=1, keepdim=True).clamp_min(tiny)
    return relative * col_sq_mean.to(torch.float32).sqrt().pow(alpha).unsqueeze(0)


def column_sums(weight: torch.Tensor) -> torch.Tensor:
    """sum_i |W_ij| ([1, in]) over the whole matrix, the same arithmetic as ``ria_scores`` of every row."""
    return weight.detach().to(torch.float32).abs().sum(dim=0, keepdim=True)


def ria_prune_mask(weight: torch.Tensor, col_sq_mean: torch.Tensor, sparsity: float, pattern: Pattern,
                   alpha: float = 0.5, scope: str = "matrix") -> torch.Tensor:
    """RIA's mask; a per-row budget and N:M are decided a chunk of rows at a time (``mask_by_rows``)."""
    if not pattern.is_nm and scope == "matrix":
        return mask_from_scores(ria_scores(weight, col_sq_mean, alpha), sparsity, pattern, scope=scope)
    col_sums = column_sums(weight)
    return mask_by_rows(lambda rows: ria_scores(weight, col_sq_mean, alpha, rows=rows, col_sums=col_sums),
                        tuple(weight.shape), sparsity, pattern, scope=scope)
