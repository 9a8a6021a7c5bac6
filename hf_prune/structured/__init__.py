"""Structured removal that really shrinks a model: slicing Linear layers and rewriting the config so that the
result still loads with stock ``from_pretrained``. Shared by every structured method (ModHiFi, SPP)."""

from .mlp import MLPGroup, keep_columns, keep_rows, mlp_groups, set_mlp_width, shrink_mlp

__all__ = ["MLPGroup", "keep_columns", "keep_rows", "mlp_groups", "set_mlp_width", "shrink_mlp"]
