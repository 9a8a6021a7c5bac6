"""Wanda (Sun et al., 2024): score |W_ij| * ||x_j||, compared within each output row. Pure tensor math."""

from __future__ import annotations

import torch

from ...patterns import Pattern, mask_from_scores


def wanda_scores(weight: torch.Tensor, col_sq_mean: torch.Tensor) -> torch.Tensor:
    """|W| times the input feature norm; ``col_sq_mean`` is E[x_j^2] per input feature ([in]).

    Any positive per-layer constant (sum vs mean over tokens) leaves the ranking unchanged.
    """
    return weight.detach().to(torch.float32).abs().mul_(col_sq_mean.to(torch.float32).sqrt().unsqueeze(0))


def wanda_prune_mask(weight: torch.Tensor, col_sq_mean: torch.Tensor, sparsity: float, pattern: Pattern,
                     scope: str = "row") -> torch.Tensor:
    return mask_from_scores(wanda_scores(weight, col_sq_mean), sparsity, pattern, scope=scope)
