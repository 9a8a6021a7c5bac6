from ..layerwise import register_layerwise
from .config import SparseGPTConfig

register_layerwise(SparseGPTConfig, display_name="SparseGPT")

__all__ = ["SparseGPTConfig"]
