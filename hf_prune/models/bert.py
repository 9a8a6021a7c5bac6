"""BERT encoders (all-MiniLM and friends)."""

from __future__ import annotations

from torch import nn

from .spec import AttentionSpec, Family, MLPSpec, Stage, first_existing, register_family

MLP = MLPSpec(("intermediate.dense",), "output.dense", "intermediate_size")
ATTENTION = AttentionSpec("attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense", module="attention.self", head_dim_attr="attention_head_size",
                          heads_attr="num_attention_heads", total_attr="all_head_size")


def _stages(model: nn.Module) -> list[Stage]:
    path = first_existing(model, ("bert.encoder.layer", "encoder.layer"))
    return [Stage("encoder", path, mlp=MLP, attention=ATTENTION)] if path else []


FAMILY = register_family(Family("bert", ("bert",), resolve=_stages))
