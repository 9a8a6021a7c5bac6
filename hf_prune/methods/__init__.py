"""Built-in pruning methods; importing this package registers each of them."""

from .input_compensation import InputCompensationConfig
from .magnitude import MagnitudeConfig
from .ria import RIAConfig
from .sparsegpt import SparseGPTConfig
from .wanda import WandaConfig

__all__ = ["InputCompensationConfig", "MagnitudeConfig", "RIAConfig", "SparseGPTConfig", "WandaConfig"]
