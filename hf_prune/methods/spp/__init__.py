"""SPP: solution-path pruning (Ding et al., ICLR 2025) with a Trainer callback, and a training-free variant."""

from ...registry import register_method
from .config import SPPConfig
from .masks import SPPMasks, attach_masks
from .path import SolutionPath, save_model
from .run import run_spp
from .training_free import serves, training_free_path
from .units import MaskUnit, build_units

register_method(SPPConfig, run_spp, display_name="SPP",
                needs_data=lambda config: config.path is None and config.training_free, serves=serves)

__all__ = ["MaskUnit", "SPPConfig", "SPPMasks", "SolutionPath", "attach_masks", "build_units", "run_spp",
           "save_model", "training_free_path"]
