"""ECoFLaP: zeroth- or first-order scores -> per-layer sparsity allocation -> any layer-wise pruner."""

from ...config import register_method
from .config import ECoFLaPConfig
from .run import allocate, run_ecoflap

register_method(ECoFLaPConfig, run_ecoflap)

__all__ = ["ECoFLaPConfig", "allocate", "run_ecoflap"]
