"""Wanda (Sun et al., 2024): score |W_ij| * ||x_j||, compared within each output row. Pure tensor math."""

from __future__ import annotations

import torch

from ...patterns import Pattern, mask_by_rows


def wanda_scores(weight: torch.Tensor, col_sq_mean: torch.Tensor) -> torch.Tensor:
    """|W| times the input feature norm; ``col_sq_mean`` is E[x_j^2] per input feature ([in]).

    Any positive per-layer constant (sum vs mean over tokens) leaves the ranking unchanged.
    """
    return weight.detach().to(torch.float32).abs().mul_(col_sq_mean.to(torch.float32).sqrt().unsqueeze(0))


def wanda_prune_mask(weight: torch.Tensor, col_sq_mean: torch.Tensor, sparsity: float, pattern: Pattern,
                     scope: str = "row") -> torch.Tensor:
    """Wanda's mask; a per-row budget and N:M are decided a chunk of rows at a time (``mask_by_rows``: the same mask,
    a bounded working set)."""
    return mask_by_rows(lambda rows: wanda_scores(weight[rows], col_sq_mean), tuple(weight.shape), sparsity, pattern,
                        scope=scope)
