"""``transformers.TrainerCallback``s. Each lives in its own module; this file only re-exports them.
Callbacks carry no knobs of their own: the knobs live in the method's config."""

from .input_compensation import InputCompensationCallback
from .solution_path import SolutionPathCallback
from .sparsity import SparsityPreservingCallback

__all__ = ["InputCompensationCallback", "SolutionPathCallback", "SparsityPreservingCallback"]
