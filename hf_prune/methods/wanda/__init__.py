from ..layerwise import register_layerwise
from .config import WandaConfig

register_layerwise(WandaConfig, display_name="Wanda", default=True)  # the papers' common baseline

__all__ = ["WandaConfig"]
