"""Training a pruned model without losing its sparsity: ``WeightMasks``, the mask-keeping Trainer callback, and a
LoRA merge that keeps the zeros."""

from .callback import SparsityPreservingCallback
from .lora import merge_lora_keep_sparsity
from .weight_masks import WeightMasks

__all__ = ["SparsityPreservingCallback", "WeightMasks", "merge_lora_keep_sparsity"]
