"""``SparseGPTConfig``: OBS pruning with weight reconstruction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...checks import check_choice, check_int, check_number
from ...patterns import Pattern
from ..layerwise import LayerwiseConfig
from .ops import FACTORIZATIONS, inverse_hessian_factor, obs_channel_scores, sparsegpt_prune


@dataclass(kw_only=True)
class SparseGPTConfig(LayerwiseConfig):
    """SparseGPT. ``block_size``: columns per lazy-update block (128); ``damp``: dampening as a fraction of
    the mean Hessian diagonal (0.01), raised tenfold up to ``max_damp`` when the Hessian is not positive
    definite; ``factorization``: how the inverse-Hessian factor is computed, ``"cholesky_inverse"`` (the reference
    code's three factorisations; today's results bit for bit) or ``"triangular_inverse"`` (one Cholesky and one
    triangular inverse, about 1.6x cheaper, equal up to float32 rounding, which can flip nearly tied mask entries).
    Linears reading the same input (q/k/v, gate/up) share one factor either way."""

    method: ClassVar[str] = "sparsegpt"
    statistics: ClassVar[frozenset] = frozenset({"gram"})

    block_size: int = 128
    damp: float = 0.01
    max_damp: float = 1.0
    factorization: str = "cholesky_inverse"

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_int(owner, "block_size", self.block_size, 1)
        check_number(owner, "damp", self.damp, 0.0, 1.0, low_inclusive=False, high_inclusive=True)
        check_number(owner, "max_damp", self.max_damp, self.damp, 100.0, high_inclusive=True)
        check_choice(owner, "factorization", self.factorization, FACTORIZATIONS)
        pattern = Pattern.parse(self.pattern)
        if pattern.is_nm and self.block_size % pattern.m:
            raise ValueError(f"{owner}.block_size={self.block_size} must be a multiple of M={pattern.m} "
                             f"for pattern {pattern}.")

    @staticmethod
    def solve_cost(in_features: int, out_features: int) -> tuple[int, float]:
        """An fp32 copy of the weight and three in x in matrices (Hessian, its factor, the inverse); the Cholesky,
        the inverse and the column-by-column update."""
        return (4 * (in_features * out_features + 3 * in_features ** 2),
                2 * in_features ** 3 + 2 * out_features * in_features ** 2)

    def channel_scores(self, weight, stats):
        return obs_channel_scores(weight, stats.hessian, self.damp, self.max_damp, self.factorization)

    def prune_weight(self, weight, stats, sparsity: float, pattern: Pattern):
        # Linears that read the same input share one statistics object, hence one Hessian and one factor
        key = ("inverse_hessian_factor", self.damp, self.max_damp, self.factorization)
        factor = stats.derived.get(key)
        if factor is None:
            # stats.hessian is a fresh scaled copy of the Gram: the factorisation may work in it
            factor = stats.derived[key] = inverse_hessian_factor(stats.hessian, self.damp, self.max_damp,
                                                                 self.factorization, overwrite=True)
        return sparsegpt_prune(weight, None, sparsity, pattern, block_size=self.block_size, damp=self.damp,
                               max_damp=self.max_damp, factor=factor)
