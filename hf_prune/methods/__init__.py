"""Built-in pruning methods; importing this package registers each of them."""

from .magnitude import MagnitudeConfig
from .modhifi import ModHiFiConfig
from .ria import RIAConfig
from .sparsegpt import SparseGPTConfig
from .wanda import WandaConfig

__all__ = ["MagnitudeConfig", "ModHiFiConfig", "RIAConfig", "SparseGPTConfig", "WandaConfig"]
