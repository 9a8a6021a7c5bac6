"""ECoFLaP: zeroth- or first-order scores -> per-layer sparsity allocation -> any layer-wise pruner."""

from typing import Any

from torch import nn

from ...engine.targets import select_modules
from ...models import get_family
from ...registry import register_method
from ..layerwise import layerwise_serves
from .config import ECoFLaPConfig
from .plan import ecoflap_cost
from .run import allocate, run_ecoflap


def serves(model: nn.Module, config: Any = None) -> str | None:
    """A layer-wise family; first-order scores also need every target's weight to be a parameter of its own (their
    gradients are reduced by hooks on it), which an expert's slice of a fused MoE parameter is not."""
    reason = layerwise_serves(model, config)
    if reason or config is None or config.score != "first_order":
        return reason
    selected = select_modules(model, get_family(model).stages(model), getattr(config, "target_modules", None),
                              getattr(config, "exclude_modules", None))
    slices = [name for name, module, *_ in selected if not isinstance(module.weight, nn.Parameter)]
    if not slices:
        return None
    return (f"ECoFLaP's first-order scores hook the gradient of each target's own weight parameter, but "
            f"{len(slices)} targets are experts' slices of fused MoE parameters (e.g. {slices[0]}); use "
            "score='zeroth_order' (the default), or leave the experts out with exclude_modules=['experts']")


register_method(ECoFLaPConfig, run_ecoflap, display_name="ECoFLaP", resumable=True, cost=ecoflap_cost,
                serves=serves)

__all__ = ["ECoFLaPConfig", "allocate", "run_ecoflap"]
