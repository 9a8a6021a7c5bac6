from ...config import register_method
from ..layerwise import run_layerwise
from .config import WandaConfig

register_method(WandaConfig, run_layerwise)

__all__ = ["WandaConfig"]
