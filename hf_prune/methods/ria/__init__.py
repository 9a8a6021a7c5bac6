from ...config import register_method
from ..layerwise import run_layerwise
from .config import RIAConfig

register_method(RIAConfig, run_layerwise)

__all__ = ["RIAConfig"]
