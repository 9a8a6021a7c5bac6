"""Structured removal that really shrinks a model: slicing Linear layers and rewriting the config so that the
result still loads with stock ``from_pretrained``. Shared by every structured method (ModHiFi, SPP)."""

from .layout import layout_of, needs_variable_layout, save_variable_layout
from .mlp import MLPGroup, keep_columns, keep_rows, mlp_groups, set_mlp_width, shrink_mlp

__all__ = ["MLPGroup", "keep_columns", "keep_rows", "layout_of", "mlp_groups", "needs_variable_layout",
           "save_variable_layout", "set_mlp_width", "shrink_mlp"]
