"""SPP's mask units: which structures (q-k pairs, v-o pairs, MLP neurons) each mask entry stands for and what it
costs, found from the model's family spec. Shared by the masks that train (``masks``) and the path that is read
off (``path``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...models import get_family
from ...structured.attention import AttentionGroup, attention_groups
from ...structured.mlp import MLPGroup, mlp_groups
from .config import SPPConfig

ATTRIBUTE = "hf_prune_spp"


@dataclass
class MaskUnit:
    """One mask vector: which structures its entries stand for and what each entry costs (JSON-ready)."""

    name: str  # "<block>.<kind>"
    kind: str  # "qk" | "vo" | "mlp"
    stage: str
    block: str
    shape: list[int]
    module: str  # the Linear whose output (qk, vo) or input (mlp) it multiplies
    modules: dict[str, Any]  # q/k/v/o names, or inputs/output of the MLP
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    rope: bool = False
    shared: bool = False
    width: int = 0
    cost: dict[str, float] = field(default_factory=dict)  # per entry: params, flops, entries

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def hook(self) -> str:
        return "input" if self.kind == "mlp" else "output"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MaskUnit":
        return cls(**data)

    # ---- from entries to features ----------------------------------------------------------------
    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """The per-feature multiplier of the hooked Linear for mask ``values`` (shape ``self.shape``)."""
        if self.kind == "mlp":
            return values
        per_head = values.reshape(-1, values.shape[-1]).expand(self.kv_heads, values.shape[-1])
        if self.kind == "qk" and self.rope:
            per_head = torch.cat([per_head, per_head], dim=-1)
        return per_head.reshape(-1)

    def kept_dims(self, keep: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """Kept feature indices for a boolean keep-mask of this unit: per key/value head for attention units."""
        keep = keep.reshape(self.shape).bool()
        if self.kind == "mlp":
            return torch.nonzero(keep).flatten()
        dims = self.expand(keep.float()).reshape(self.kv_heads, self.head_dim).bool()
        return [torch.nonzero(row).flatten() for row in dims]


# --------------------------------------------------------------------------------------------------
# building the units of a model


def _linear(model: nn.Module, name: str) -> nn.Linear:
    return model.get_submodule(name)


def _bias(linear: nn.Linear) -> int:
    return 1 if linear.bias is not None else 0


def _attention_units(model: nn.Module, group: AttentionGroup, config: SPPConfig) -> list[MaskUnit]:
    q, k, v, o = (_linear(model, getattr(group, key)) for key in ("q", "k", "v", "o"))
    gs, seq = group.group_size, config.flops_seq_len
    served = group.kv_heads if config.share_across_heads else 1  # key/value heads one entry stands for
    lead = [] if config.share_across_heads else [group.kv_heads]
    modules = {"q": group.q, "k": group.k, "v": group.v, "o": group.o, "module": group.module}
    common = dict(stage=group.stage.name, block=group.block, modules=modules, heads=group.heads,
                  kv_heads=group.kv_heads, head_dim=group.head_dim, rope=group.rope,
                  shared=config.share_across_heads)
    units = []
    if "qk" in config.groups:
        dims = 2 if group.rope else 1
        width = group.head_dim // dims
        params = dims * served * ((k.in_features + _bias(k)) + gs * (q.in_features + _bias(q)))
        flops = dims * served * (2 * k.in_features + gs * 2 * q.in_features + gs * 2 * seq)
        units.append(MaskUnit(name=f"{group.block}.qk", kind="qk", shape=lead + [width], module=group.k,
                              cost={"params": float(params), "flops": float(flops), "entries": 1.0}, **common))
    if "vo" in config.groups:
        params = served * ((v.in_features + _bias(v)) + gs * o.out_features)
        flops = served * (2 * v.in_features + gs * 2 * seq + gs * 2 * o.out_features)
        units.append(MaskUnit(name=f"{group.block}.vo", kind="vo", shape=lead + [group.head_dim], module=group.v,
                              cost={"params": float(params), "flops": float(flops), "entries": 1.0}, **common))
    return units


def _mlp_unit(model: nn.Module, group: MLPGroup) -> MaskUnit:
    inputs = [_linear(model, n) for n in group.inputs]
    out = _linear(model, group.output)
    params = sum(lin.in_features + _bias(lin) for lin in inputs) + out.out_features
    flops = sum(2 * lin.in_features for lin in inputs) + 2 * out.out_features
    return MaskUnit(name=f"{group.block}.mlp", kind="mlp", stage=group.stage.name, block=group.block,
                    shape=[group.width], module=group.output,
                    modules={"inputs": list(group.inputs), "output": group.output}, width=group.width,
                    cost={"params": float(params), "flops": float(flops), "entries": 1.0})


def build_units(model: nn.Module, config: SPPConfig) -> list[MaskUnit]:
    """The mask units of ``model`` for ``config.groups``, block by block in walk order."""
    stages = get_family(model).stages(model)
    attention = {g.block: g for g in attention_groups(model, stages)} if {"qk", "vo"} & set(config.groups) else {}
    mlps = {g.block: g for g in mlp_groups(model, stages)} if "mlp" in config.groups else {}
    units = []
    for stage in stages:
        for block in stage.block_names(model):
            if block in attention:
                units.extend(_attention_units(model, attention[block], config))
            if block in mlps:
                units.append(_mlp_unit(model, mlps[block]))
    if not units:
        raise ValueError(f"SPPConfig.groups={config.groups!r} gives no mask on {type(model).__name__}: its blocks have "
                         "no such structure hf_prune can remove; add 'mlp'.")
    return units


def unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, ATTRIBUTE):
        model = model.module  # DDP / accelerate wrappers
    return model


def model_info(model: nn.Module) -> dict:
    model = unwrap(model)
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "model_type": getattr(config, "model_type", None),
            "name_or_path": getattr(config, "_name_or_path", None) or None}


def carries_masks(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a wrapper holds) carries SPP masks."""
    return getattr(unwrap(model), ATTRIBUTE, None) is not None
