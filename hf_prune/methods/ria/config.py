"""``RIAConfig``: relative importance x activation norm^alpha."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...checks import check_number
from ...patterns import Pattern
from ..layerwise import LayerwiseConfig, check_scope
from .ops import ria_prune_mask, ria_scores


@dataclass(kw_only=True)
class RIAConfig(LayerwiseConfig):
    """RIA. ``alpha``: exponent of the activation norm (0.5 in the paper); ``scope``: ``"matrix"``
    (RIA's default, one threshold per layer) or ``"row"``. With an N:M pattern, ``channel_permutation=True``
    adds the paper's channel reallocation for the MLP hidden neurons (exact: the producers are reordered to
    match; attention inputs stay in order), see ``LayerwiseConfig``."""

    method: ClassVar[str] = "ria"
    statistics: ClassVar[frozenset] = frozenset({"sq_norm"})

    alpha: float = 0.5
    scope: str = "matrix"

    @staticmethod
    def solve_cost(in_features: int, out_features: int) -> tuple[int, float]:
        """The mask's working set per Linear, for the planner's memory: RIA's scores of the whole matrix (the default
        one threshold per matrix) hold |W|, its two relative terms and their sum at once (16 bytes a weight), then
        the scores, NumPy's partitioned copy and the bool mask; no matrix products to speak of."""
        return 16 * in_features * out_features, 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(type(self).__name__, "alpha", self.alpha, 0.0, 4.0, high_inclusive=True)
        check_scope(type(self).__name__, self.scope)

    def channel_scores(self, weight, stats):
        return ria_scores(weight, stats.col_sq_mean, self.alpha)

    def prune_weight(self, weight, stats, sparsity: float, pattern: Pattern):
        mask = ria_prune_mask(weight, stats.col_sq_mean, sparsity, pattern, self.alpha, self.scope)
        return weight, mask, {}  # the engine zeroes the mask in place
