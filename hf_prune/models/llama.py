"""The LLaMA family (LLaMA, Mistral, Qwen2, Qwen3): grouped-query attention with rotary embeddings.

``LlamaAttention`` reads only ``head_dim`` (head counts are inferred from the projection widths) and recomputes
cos/sin from ``config.head_dim``."""

from __future__ import annotations

from .discovery import discovered
from .spec import AttentionSpec, Family, MLPSpec, register_family

MLP = MLPSpec(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size")
ATTENTION = AttentionSpec("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          module="self_attn", kv_heads_key="num_key_value_heads", head_dim_key="head_dim", rope=True)

FAMILY = register_family(Family(
    "llama", ("llama", "mistral", "qwen2", "qwen3"), causal_lm=True,
    resolve=discovered(MLP, ATTENTION, name="decoder")))
