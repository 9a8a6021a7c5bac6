"""Magnitude pruning: remove the smallest |W|. Pure tensor math."""

from __future__ import annotations

import torch

from ...patterns import Pattern, mask_by_rows


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float32).abs()


def magnitude_prune_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern, scope: str = "matrix") -> torch.Tensor:
    """Prune mask of the smallest-magnitude weights; one threshold per matrix by default (the papers' baseline)."""
    return mask_by_rows(lambda rows: magnitude_scores(weight[rows]), tuple(weight.shape), sparsity, pattern,
                        scope=scope)
