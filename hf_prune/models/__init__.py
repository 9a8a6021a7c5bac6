"""Model knowledge: the family spec (``spec``) and one small file per family for what cannot be derived from
transformers (block lists, tower run functions, structured specs). Importing this package registers every
built-in family."""

from . import bert, blip2, clip, llama, opt, resnet, vit  # noqa: F401  (importing registers each family)
from .discovery import block_lists, discover_stages, discovered, get_family, text_context
from .inputs import PixelInput, pixel_input
from .layers import as_matrix, in_features, is_conv1d, is_linear_like, out_features
from .spec import (
                   AttentionSpec,
                   Family,
                   FamilyLoss,
                   MLPSpec,
                   Stage,
                   family_for_type,
                   is_causal_lm,
                   register_family,
                   registered_families,
                   supported_families,
)

__all__ = ["AttentionSpec", "Family", "FamilyLoss", "MLPSpec", "PixelInput", "Stage", "as_matrix", "block_lists",
           "discover_stages", "discovered", "family_for_type", "get_family", "in_features", "is_causal_lm",
           "is_conv1d", "is_linear_like", "out_features", "pixel_input", "register_family", "registered_families",
           "supported_families", "text_context"]
