"""BERT encoders (all-MiniLM and friends)."""

from __future__ import annotations

from .discovery import discovered
from .spec import AttentionSpec, Family, MLPSpec, register_family

MLP = MLPSpec(("intermediate.dense",), "output.dense", "intermediate_size")
ATTENTION = AttentionSpec("attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense", module="attention.self", head_dim_attr="attention_head_size",
                          heads_attr="num_attention_heads", total_attr="all_head_size")


FAMILY = register_family(Family("bert", ("bert",), resolve=discovered(MLP, ATTENTION, name="encoder")))
