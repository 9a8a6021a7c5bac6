from ..layerwise import register_layerwise
from .config import WandaConfig

register_layerwise(WandaConfig, display_name="Wanda")

__all__ = ["WandaConfig"]
