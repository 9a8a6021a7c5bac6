"""Structured removal that really shrinks a model: slicing Linear layers and rewriting the config so that the
result still loads with stock ``from_pretrained``. Shared by every structured method (ModHiFi, SPP)."""

from .attention import AttentionGroup, attention_groups, set_attention_geometry, shrink_attention, zero_attention
from .layout import layout_of, needs_variable_layout, save_variable_layout
from .mlp import MLPGroup, keep_columns, keep_rows, mlp_groups, set_mlp_width, shrink_mlp

__all__ = ["AttentionGroup", "MLPGroup", "attention_groups", "keep_columns", "keep_rows", "layout_of",
           "mlp_groups", "needs_variable_layout", "save_variable_layout", "set_attention_geometry", "set_mlp_width",
           "shrink_attention", "shrink_mlp", "zero_attention"]
