"""Self-attention as removable structures: q-k dimensions, v-o dimensions and whole heads, per block.

A q-k dimension d of key/value head g is row d of g's slice of ``k`` plus row d of every query head of g's group
in ``q``: the attention scores sum q_d k_d over d, so removing the pair removes one term exactly. A v-o dimension
d of head g is row d of g's slice of ``v`` plus column d of every query head of the group in ``o``. A head whose
v-o dimensions are all removed contributes nothing and is removed whole (with its q-k rows).

Stock attention modules split q, k *and* v with one per-head width (``head_dim``/``attention_head_size``), so
after removal every kept head of a block keeps the same number D of slots: its kept q-k dimensions (then zero
rows) in q/k, its kept v-o dimensions (then zero rows/columns) in v/o, with D the largest count kept by any head
of the block. Zero slots contribute exactly nothing. The softmax scale stays the original one (it is a module
attribute computed once), so the smaller block computes what the masked block did.

Rotary (RoPE) models are different: the rotary frequencies are recomputed from ``config.head_dim`` for the whole
model and ``rotate_half`` pairs d with d + head_dim/2, so the head width cannot change. There, removed q-k and v-o
dimensions are zeroed at full width (exact, no size change), and only whole key/value groups whose v-o
dimensions are all removed leave the model physically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..models import AttentionSpec, Stage, get_family
from .layout import layout_of


@dataclass
class AttentionGroup:
    """The self-attention of one block: full module names and its current geometry."""
    stage: Stage
    block: str
    q: str
    k: str
    v: str
    o: str
    module: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def spec(self) -> AttentionSpec:
        return self.stage.attention

    @property
    def group_size(self) -> int:
        """Query heads served by each key/value head."""
        return self.heads // self.kv_heads

    @property
    def rope(self) -> bool:
        return self.spec.rope


def attention_groups(model: nn.Module, stages: list[Stage] | None = None) -> list[AttentionGroup]:
    """The self-attention of every block of every stage that has one, in walk order."""
    stages = get_family(model).stages(model) if stages is None else stages
    groups = []
    for stage in stages:
        spec = stage.attention
        if spec is None:
            continue
        for block in stage.block_names(model):
            names = {key: f"{block}.{getattr(spec, key)}" for key in ("q", "k", "v", "o")}
            module_name = f"{block}.{spec.module}"
            lin = {key: model.get_submodule(name) for key, name in names.items()}
            head_dim = int(getattr(model.get_submodule(module_name), spec.head_dim_attr))
            q_out, k_out, v_out, o_in = (lin["q"].out_features, lin["k"].out_features, lin["v"].out_features,
                                         lin["o"].in_features)
            if head_dim <= 0 or q_out % head_dim or k_out % head_dim or k_out != v_out or o_in != q_out:
                raise ValueError(f"{module_name}: q/k/v/o widths {q_out}/{k_out}/{v_out}/{o_in} do not split into "
                                 f"heads of {spec.head_dim_attr}={head_dim}; the attention layout is not the one "
                                 "hf_prune expects.")
            heads, kv_heads = q_out // head_dim, k_out // head_dim
            if heads % kv_heads:
                raise ValueError(f"{module_name}: {heads} query heads cannot be grouped over {kv_heads} key/value "
                                 "heads.")
            if spec.rope and head_dim % 2:
                raise ValueError(f"{module_name}: rotary attention needs an even head width, got {head_dim}.")
            groups.append(AttentionGroup(stage, block, names["q"], names["k"], names["v"], names["o"], module_name,
                                         heads, kv_heads, head_dim))
    return groups


def _dims(keep: Sequence, group: AttentionGroup, what: str) -> list[torch.Tensor]:
    """Validated, sorted kept dimensions per key/value head."""
    if len(keep) != group.kv_heads:
        raise ValueError(f"{group.module}: {what} needs one list of kept dimensions per key/value head "
                         f"({group.kv_heads}), got {len(keep)}.")
    out = []
    for g, dims in enumerate(keep):
        idx = torch.as_tensor(dims, dtype=torch.long).flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= group.head_dim):
            raise ValueError(f"{group.module}: {what} dimensions of head {g} must lie in [0, {group.head_dim}).")
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"{group.module}: {what} dimensions of head {g} contain duplicates.")
        out.append(idx.sort().values)
    return out


def _check_rope_pairs(dims: list[torch.Tensor], group: AttentionGroup) -> None:
    half = group.head_dim // 2
    for g, idx in enumerate(dims):
        kept = set(idx.tolist())
        partners = {(d + half) % group.head_dim for d in kept}
        if kept != partners:
            raise ValueError(f"{group.module}: rotary q-k dimensions come in pairs (d, d + {half}); the kept "
                             f"dimensions of key/value head {g} break a pair, so removing them would not be exact.")


def _gather(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Rebuild ``linear`` keeping rows (``dim=0``, with their bias) or columns (``dim=1``) ``index``; -1 = a zero."""
    weight = linear.weight
    valid = index >= 0
    src = index.clamp_min(0).to(weight.device)
    with torch.no_grad():
        new = weight.index_select(dim, src).clone()
        fill = (~valid).to(weight.device)
        if dim == 0:
            new[fill] = 0
        else:
            new[:, fill] = 0
        linear.weight = nn.Parameter(new, requires_grad=weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            bias = linear.bias.index_select(0, src).clone()
            bias[fill] = 0
            linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    if dim == 0:
        linear.out_features = index.numel()
    else:
        linear.in_features = index.numel()


def _slots(dims: torch.Tensor, width: int, offset: int, slots: int) -> torch.Tensor:
    """Row indices ``offset + dims`` padded with -1 (zero rows) to ``slots`` entries."""
    out = torch.full((slots,), -1, dtype=torch.long)
    out[: dims.numel()] = dims + offset
    return out


def zero_attention(model: nn.Module, group: AttentionGroup, keep_qk: Sequence, keep_vo: Sequence) -> None:
    """Zero, in place and at full width, every q-k and v-o dimension not kept: the rows of ``k`` (and its bias)
    and of ``v`` (and its bias). This is the *masked* block; ``shrink_attention`` removes the same structures."""
    qk, vo = _dims(keep_qk, group, "keep_qk"), _dims(keep_vo, group, "keep_vo")
    hd = group.head_dim
    with torch.no_grad():
        for key, dims in (("k", qk), ("v", vo)):
            linear = model.get_submodule(getattr(group, key))
            drop = torch.ones(group.kv_heads, hd, dtype=torch.bool)
            for g, idx in enumerate(dims):
                drop[g, idx] = False
            drop = drop.flatten().to(linear.weight.device)
            linear.weight[drop] = 0
            if linear.bias is not None:
                linear.bias[drop] = 0


def shrink_attention(model: nn.Module, group: AttentionGroup, keep_qk: Sequence, keep_vo: Sequence) -> dict:
    """Remove every q-k and v-o dimension of ``group`` not kept, and every head left without v-o dimensions.

    ``keep_qk`` / ``keep_vo``: per key/value head, the kept dimension indices in [0, head_dim). The block then
    computes what ``zero_attention`` with the same arguments computes (see the module docstring for what is
    physical and what is zeroed). Validates everything before changing anything; returns the new geometry.
    """
    qk, vo = _dims(keep_qk, group, "keep_qk"), _dims(keep_vo, group, "keep_vo")
    if group.rope:
        _check_rope_pairs(qk, group)
    kept_kv = [g for g in range(group.kv_heads) if vo[g].numel() > 0]
    if not kept_kv:
        raise ValueError(f"{group.module}: every v-o dimension would be removed, which removes the whole attention; "
                         "keep at least one.")
    spec, hd, gs = group.spec, group.head_dim, group.group_size
    q, k, v, o = (model.get_submodule(getattr(group, key)) for key in ("q", "k", "v", "o"))
    if group.rope:  # zero at full width, then drop whole key/value groups
        zero_attention(model, group, qk, vo)
        with torch.no_grad():
            for g in range(group.kv_heads):
                drop_qk = torch.ones(hd, dtype=torch.bool)
                drop_qk[qk[g]] = False
                drop_vo = torch.ones(hd, dtype=torch.bool)
                drop_vo[vo[g]] = False
                for h in range(g * gs, (g + 1) * gs):
                    rows = torch.nonzero(drop_qk).flatten() + h * hd
                    q.weight[rows.to(q.weight.device)] = 0
                    if q.bias is not None:
                        q.bias[rows.to(q.weight.device)] = 0
                    cols = torch.nonzero(drop_vo).flatten() + h * hd
                    o.weight[:, cols.to(o.weight.device)] = 0
        slots = hd
        q_rows = torch.cat([torch.arange(hd) + h * hd for g in kept_kv for h in range(g * gs, (g + 1) * gs)])
        kv_rows = torch.cat([torch.arange(hd) + g * hd for g in kept_kv])
        qk_rows, v_rows, o_cols = q_rows, kv_rows, q_rows
        k_rows = kv_rows
    else:
        slots = max(max(qk[g].numel(), vo[g].numel()) for g in kept_kv)
        q_rows = torch.cat([_slots(qk[g], hd, h * hd, slots) for g in kept_kv for h in range(g * gs, (g + 1) * gs)])
        k_rows = torch.cat([_slots(qk[g], hd, g * hd, slots) for g in kept_kv])
        v_rows = torch.cat([_slots(vo[g], hd, g * hd, slots) for g in kept_kv])
        o_cols = torch.cat([_slots(vo[g], hd, h * hd, slots) for g in kept_kv for h in range(g * gs, (g + 1) * gs)])
        qk_rows = q_rows
    _gather(q, qk_rows, 0)
    _gather(k, k_rows, 0)
    _gather(v, v_rows, 0)
    _gather(o, o_cols, 1)
    heads = len(kept_kv) * gs
    module = model.get_submodule(group.module)
    setattr(module, spec.head_dim_attr, slots)
    if spec.heads_attr:
        setattr(module, spec.heads_attr, heads)
    if spec.total_attr:
        setattr(module, spec.total_attr, heads * slots)
    group.heads, group.kv_heads, group.head_dim = heads, len(kept_kv), slots
    return {"heads": heads, "kv_heads": len(kept_kv), "head_dim": slots}


def _stage_geometry(model: nn.Module, stage: Stage) -> set[tuple[int, int, int]]:
    return {(g.heads, g.kv_heads, g.head_dim) for g in attention_groups(model, [stage])}


def set_attention_geometry(model: nn.Module, stage: Stage) -> bool:
    """Write the stage's attention geometry into its stock config when every block has the same one and the
    family's config can express it, so the stock class rebuilds it; returns whether it did.

    Where the head width changes (ViT), the module's softmax scale would be recomputed from the new width on
    reload, so the ratio of the old to the new scale is folded into ``q`` (exact up to float rounding). Where the
    config cannot hold the geometry (BERT/OPT/CLIP derive the width from hidden_size / heads, or the blocks
    differ), nothing changes and ``save_variable_layout`` records the per-block shapes instead.
    """

    spec = stage.attention
    geometry = _stage_geometry(model, stage)
    if spec is None or len(geometry) != 1:
        return False
    heads, kv_heads, head_dim = geometry.pop()
    config = stage.config(model)
    groups = attention_groups(model, [stage])
    old_width = int(getattr(config, spec.head_dim_key, 0) or 0) if spec.head_dim_key else 0
    if not old_width:
        old_width = config.hidden_size // getattr(config, spec.heads_key)
    if head_dim != old_width and not spec.head_dim_key:
        return False
    updates = {spec.heads_key: heads}
    if spec.kv_heads_key:
        updates[spec.kv_heads_key] = kv_heads
    if spec.head_dim_key:
        updates[spec.head_dim_key] = head_dim
    saved = {key: getattr(config, key, None) for key in updates}
    for key, value in updates.items():
        setattr(config, key, value)
    rescale = head_dim != old_width and spec.scaling_attr is not None
    try:
        layout = layout_of(model)
    except Exception:  # the config refused the geometry when the reference model was built from it
        layout = None
    clean = layout is not None
    if clean:
        for g in groups:
            changed = set(layout["attributes"].get(g.module, {})) - ({spec.scaling_attr} if rescale else set())
            if changed or any(name in layout["linears"] for name in (g.q, g.k, g.v, g.o)):
                clean = False
    if not clean:
        for key, value in saved.items():
            setattr(config, key, value)
        return False
    if rescale:  # the reloaded module computes head_dim**-0.5: fold the old scale into q
        for g in groups:
            module = model.get_submodule(g.module)
            ratio = getattr(module, spec.scaling_attr) / head_dim ** -0.5
            setattr(module, spec.scaling_attr, head_dim ** -0.5)
            q = model.get_submodule(g.q)
            with torch.no_grad():
                q.weight.mul_(ratio)
                if q.bias is not None:
                    q.bias.mul_(ratio)
    return True
