from ..layerwise import register_layerwise
from .config import MagnitudeConfig

register_layerwise(MagnitudeConfig, display_name="Magnitude")

__all__ = ["MagnitudeConfig"]
