"""ECoFLaP: zeroth- or first-order scores -> per-layer sparsity allocation -> any layer-wise pruner."""

from ...registry import register_method
from ..layerwise import layerwise_serves
from .config import ECoFLaPConfig
from .plan import ecoflap_cost
from .run import allocate, run_ecoflap

register_method(ECoFLaPConfig, run_ecoflap, display_name="ECoFLaP", resumable=True, cost=ecoflap_cost,
                serves=layerwise_serves)

__all__ = ["ECoFLaPConfig", "allocate", "run_ecoflap"]
