"""Moved: the mask math is in ``hf_prune.patterns``, ``WeightMasks`` in ``hf_prune.training``. This module keeps the
old import paths (``hf_prune.masks.WeightMasks``, ``hf_prune.masks.Pattern``) working."""

from .patterns import (  # noqa: F401
                       Pattern,
                       mask_from_scores,
                       nm_prune_mask,
                       nm_violations,
                       prune_count,
                       smallest_k_mask,
                       smallest_k_per_row,
                       sparsity_of,
)
from .training.weight_masks import WeightMasks  # noqa: F401
