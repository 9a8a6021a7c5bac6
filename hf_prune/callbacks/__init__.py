"""``transformers.TrainerCallback``s for training pruned models (one module per callback; re-exported here)."""

from .input_compensation import InputCompensationCallback

__all__ = ["InputCompensationCallback"]
