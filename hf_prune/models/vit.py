"""ViT image encoders (the transformers 5 layout, and the older one that used BERT's names)."""

from __future__ import annotations

from torch import nn

from . import bert
from .spec import FC_MLP, AttentionSpec, Family, Stage, first_existing, patch_tokens, register_family

ATTENTION = AttentionSpec("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                          module="attention", heads_attr="num_attention_heads", head_dim_key="head_dim")


def _stages(model: nn.Module) -> list[Stage]:
    path = first_existing(model, ("vit.layers", "layers", "vit.encoder.layer", "encoder.layer"))
    if not path:
        return []
    old = path.endswith("encoder.layer")  # older ViT layout used BERT's names (attention slicing: new layout only)
    return [Stage("encoder", path, requires=("pixel_values",), mask_key=None, mlp=bert.MLP if old else FC_MLP,
                  attention=None if old else ATTENTION, tokens=patch_tokens)]


FAMILY = register_family(Family("vit", ("vit",), resolve=_stages))
