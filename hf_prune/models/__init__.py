"""Model knowledge: the family spec (``spec``) and one small file per family for what cannot be derived from
transformers (block lists, tower run functions, structured specs). Importing this package registers every
built-in family."""

from . import bert, blip2, clip, llama, opt, resnet, vit  # noqa: F401  (importing registers each family)
from .inputs import PixelInput, pixel_input
from .spec import (
                   AttentionSpec,
                   Family,
                   FamilyLoss,
                   MLPSpec,
                   Stage,
                   family_for_type,
                   get_family,
                   is_causal_lm,
                   register_family,
                   registered_families,
                   supported_families,
                   text_context,
)

__all__ = ["AttentionSpec", "Family", "FamilyLoss", "MLPSpec", "PixelInput", "Stage", "family_for_type", "get_family",
           "is_causal_lm", "pixel_input", "register_family", "registered_families", "supported_families", "text_context"]
