"""Built-in pruning methods; importing this package registers each of them."""

from .magnitude import MagnitudeConfig
from .ria import RIAConfig
from .sparsegpt import SparseGPTConfig
from .spp import SPPConfig, SolutionPath
from .wanda import WandaConfig

__all__ = ["MagnitudeConfig", "RIAConfig", "SPPConfig", "SolutionPath", "SparseGPTConfig", "WandaConfig"]
