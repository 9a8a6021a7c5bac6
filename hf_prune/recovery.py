"""Moved to ``hf_prune.training.lora``; this module keeps ``hf_prune.recovery.merge_lora_keep_sparsity`` working."""

from .training.lora import merge_lora_keep_sparsity  # noqa: F401
