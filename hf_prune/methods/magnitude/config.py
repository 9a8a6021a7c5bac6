"""``MagnitudeConfig``: remove the weights of smallest |W| (data-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...patterns import Pattern
from ..layerwise import LayerwiseConfig, check_scope
from .ops import magnitude_prune_mask, magnitude_scores


@dataclass(kw_only=True)
class MagnitudeConfig(LayerwiseConfig):
    """Magnitude pruning. ``scope``: where the unstructured budget is exact, per ``"matrix"`` (default,
    the papers' baseline) or per ``"row"``. Needs no calibration data."""

    method: ClassVar[str] = "magnitude"
    statistics: ClassVar[frozenset] = frozenset()

    scope: str = "matrix"

    @staticmethod
    def solve_cost(in_features: int, out_features: int) -> tuple[int, float]:
        """The mask's working set per Linear, for the planner's memory: with one threshold per matrix (the default)
        the float32 scores and NumPy's partitioned copy of them, then the bool mask (9 bytes a weight at most; a
        per-row budget or N:M needs less, a chunk of rows at a time); no matrix products to speak of."""
        return 9 * in_features * out_features, 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scope(type(self).__name__, self.scope)

    def channel_scores(self, weight, stats):
        return magnitude_scores(weight)

    def prune_weight(self, weight, stats, sparsity: float, pattern: Pattern):
        mask = magnitude_prune_mask(weight, sparsity, pattern, self.scope)
        return weight, mask, {}  # the engine zeroes the mask in place
