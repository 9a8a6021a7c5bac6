"""Built-in pruning methods; importing this package registers each of them."""

from .input_compensation import InputCompensationConfig
from .magnitude import MagnitudeConfig
from .modhifi import ModHiFiConfig
from .ria import RIAConfig
from .sparsegpt import SparseGPTConfig
from .spp import SPPConfig, SolutionPath
from .wanda import WandaConfig
from .ecoflap import ECoFLaPConfig  # noqa: E402  (after the layer-wise methods it can run as stage 2)

__all__ = ["ECoFLaPConfig", "InputCompensationConfig", "MagnitudeConfig", "ModHiFiConfig", "RIAConfig", "SPPConfig",
           "SolutionPath", "SparseGPTConfig", "WandaConfig"]
