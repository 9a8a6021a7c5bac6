"""``transformers.TrainerCallback``s. Each lives in its own module; this file only re-exports them.
Callbacks carry no knobs of their own: the knobs live in the method's config."""

from ..methods.input_compensation.callback import InputCompensationCallback
from ..methods.spp.callback import SolutionPathCallback
from ..training.callback import SparsityPreservingCallback

__all__ = ["InputCompensationCallback", "SolutionPathCallback", "SparsityPreservingCallback"]
