from ...config import register_method
from ..layerwise import run_layerwise
from .config import SparseGPTConfig

register_method(SparseGPTConfig, run_layerwise)

__all__ = ["SparseGPTConfig"]
