"""OPT: a decoder with learned positions and ``fc1``/``fc2`` MLPs."""

from __future__ import annotations

from .discovery import discovered
from .spec import AttentionSpec, Family, MLPSpec, register_family

MLP = MLPSpec(("fc1",), "fc2", "ffn_dim")
ATTENTION = AttentionSpec("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                          module="self_attn", heads_attr="num_heads")

FAMILY = register_family(Family(
    "opt", ("opt",), causal_lm=True,
    resolve=discovered(MLP, ATTENTION, name="decoder")))
