"""``WandaConfig``: |W| x ||x||, compared within each output row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...patterns import MASK_CHUNK, Pattern
from ..layerwise import LayerwiseConfig, check_scope
from .ops import wanda_prune_mask, wanda_scores


@dataclass(kw_only=True)
class WandaConfig(LayerwiseConfig):
    """Wanda. ``scope``: comparison group of the unstructured budget, ``"row"`` (the paper's per-output
    rule, default) or ``"matrix"``."""

    method: ClassVar[str] = "wanda"
    statistics: ClassVar[frozenset] = frozenset({"sq_norm"})

    scope: str = "row"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scope(type(self).__name__, self.scope)

    @staticmethod
    def solve_cost(in_features: int, out_features: int) -> tuple[int, float]:
        """The mask's working set per Linear, for the planner's memory: the bool mask (a byte a weight) and one chunk
        of rows at a time (``mask_by_rows``) of float32 scores, the per-row ``topk`` of half the columns (4-byte values
        and 8-byte indices for half the scores) and the chunk's mask; no matrix products to speak of."""
        return in_features * out_features + 11 * min(in_features * out_features, MASK_CHUNK), 0.0

    def channel_scores(self, weight, stats):
        return wanda_scores(weight, stats.col_sq_mean)

    def prune_weight(self, weight, stats, sparsity: float, pattern: Pattern):
        mask = wanda_prune_mask(weight, stats.col_sq_mean, sparsity, pattern, self.scope)
        return weight, mask, {}  # the engine zeroes the mask in place
