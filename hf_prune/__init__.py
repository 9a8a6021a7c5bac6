"""hf_prune: prune Hugging Face models with the strongest published methods."""

from .allocation import Allocation
from .calibration.config import CalibrationConfig
from .config import PrunerConfig
from .methods import ECoFLaPConfig, MagnitudeConfig, ModHiFiConfig, RIAConfig, SparseGPTConfig, WandaConfig
from .methods.input_compensation import InputCompensatedModel, InputCompensationConfig
from .methods.spp import SolutionPath, SPPConfig
from .pruner import Pruner
from .registry import available_methods, register_method
from .result import PruningResult
from .version import __version__

__all__ = [
    "Allocation",
    "CalibrationConfig",
    "ECoFLaPConfig",
    "InputCompensatedModel",
    "InputCompensationConfig",
    "MagnitudeConfig",
    "ModHiFiConfig",
    "Pruner",
    "PrunerConfig",
    "PruningResult",
    "RIAConfig",
    "SPPConfig",
    "SolutionPath",
    "SparseGPTConfig",
    "WandaConfig",
    "__version__",
    "available_methods",
    "register_method",
]
