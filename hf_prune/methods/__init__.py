"""Built-in pruning methods; importing this package registers each of them (in this order: the order of
tables such as the demo's and of capability lists in messages)."""

# the order of these imports is the registration order
# isort: skip_file

from .magnitude import MagnitudeConfig
from .wanda import WandaConfig
from .sparsegpt import SparseGPTConfig
from .ria import RIAConfig
from .ecoflap import ECoFLaPConfig
from .modhifi import ModHiFiConfig
from .spp import SPPConfig, SolutionPath
from .input_compensation import InputCompensationConfig

__all__ = ["ECoFLaPConfig", "InputCompensationConfig", "MagnitudeConfig", "ModHiFiConfig", "RIAConfig", "SPPConfig",
           "SolutionPath", "SparseGPTConfig", "WandaConfig"]
