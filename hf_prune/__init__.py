"""hf_prune: prune Hugging Face models with the strongest published methods."""

from .config import CalibrationConfig, PrunerConfig, available_methods, register_method
from .methods import MagnitudeConfig, RIAConfig, SparseGPTConfig, WandaConfig
from .methods.input_compensation import InputCompensatedModel, InputCompensationConfig
from .pruner import Pruner
from .result import PruningResult
from .version import __version__

__all__ = [
    "CalibrationConfig",
    "InputCompensatedModel",
    "InputCompensationConfig",
    "MagnitudeConfig",
    "Pruner",
    "PrunerConfig",
    "PruningResult",
    "RIAConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "__version__",
    "available_methods",
    "register_method",
]
