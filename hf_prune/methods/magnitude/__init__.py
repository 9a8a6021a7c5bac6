from ...config import register_method
from ..layerwise import run_layerwise
from .config import MagnitudeConfig

register_method(MagnitudeConfig, run_layerwise)

__all__ = ["MagnitudeConfig"]
