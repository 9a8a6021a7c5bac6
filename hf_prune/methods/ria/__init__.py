from ..layerwise import register_layerwise
from .config import RIAConfig

register_layerwise(RIAConfig, display_name="RIA")

__all__ = ["RIAConfig"]
