"""SPP's structured masks and how they ride on a model without changing its forward signature.

One *unit* per block and group:

- ``qk``: one entry per q-k head dimension of each key/value head (or one vector shared by all heads), tied across
  each RoPE rotary pair (d, d + head_dim/2), so a rotary model has head_dim/2 entries per head. It multiplies the
  *output of k* (pre-rotary, which is exact because the pair shares the entry): a zero removes the dimension from
  every score of the key/value head's whole query group.
- ``vo``: one entry per v-o dimension; it multiplies the output of v (for grouped-query attention the v
  dimension serves the whole query group, i.e. the matching columns of o for every query head of the group).
- ``mlp``: one entry per hidden neuron; it multiplies the input of the MLP's output Linear (down_proj / fc2).

The masks live in an ``SPPMasks`` module attached to the model as ``model.hf_prune_spp`` and act through forward
hooks. Their float32 parameters (alpha) and buffers (z, Gamma, first-entry and last-exit times, on-counts, path
time) are part of the model's state dict, so a ``Trainer`` checkpoint saves them with the weights and
``resume_from_checkpoint`` restores them exactly, whatever folder the checkpoint is resumed from.
"""

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
from . import ops
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


# --------------------------------------------------------------------------------------------------
# the carrier


class _UnitState(nn.Module):
    def __init__(self, shape: list[int], device: torch.device):
        super().__init__()
        f32 = dict(dtype=torch.float32, device=device)
        self.alpha = nn.Parameter(torch.ones(shape, **f32))
        self.register_buffer("z", torch.zeros(shape, **f32))
        self.register_buffer("gamma", torch.zeros(shape, **f32))
        self.register_buffer("first_entry", torch.full(shape, math.inf, **f32))
        self.register_buffer("last_exit", torch.full(shape, math.inf, **f32))
        self.register_buffer("on_count", torch.zeros(shape, dtype=torch.int32, device=device))


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, ATTRIBUTE):
        model = model.module  # DDP / accelerate wrappers
    return model


class SPPMasks(nn.Module):
    """The masks of one model and their path state (see the module docstring). Create with ``attach_masks``."""

    def __init__(self, config: SPPConfig, units: list[MaskUnit], device: torch.device):
        super().__init__()
        self.config = config
        self.specs = units
        self.units = nn.ModuleList([_UnitState(u.shape, device) for u in units])
        self.register_buffer("time", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("records", torch.zeros((), dtype=torch.int64, device=device))
        self._handles: list = []
        self._requires_grad: dict[str, bool] = {}

    # ---- attach / remove ------------------------------------------------------------------------
    @staticmethod
    def find(model: nn.Module) -> "SPPMasks | None":
        masks = getattr(_unwrap(model), ATTRIBUTE, None)
        return masks if isinstance(masks, SPPMasks) else None

    def _hook(self, index: int, unit: MaskUnit):
        state = self.units[index]
        if unit.hook == "output":
            def hook(module, args, output):
                return output * unit.expand(state.alpha).to(output.dtype)
            return hook

        def pre_hook(module, args):
            x = args[0]
            return (x * unit.expand(state.alpha).to(x.dtype),) + tuple(args[1:])
        return pre_hook

    def _register(self, model: nn.Module) -> None:
        for i, unit in enumerate(self.specs):
            module = model.get_submodule(unit.module)
            if unit.hook == "output":
                self._handles.append(module.register_forward_hook(self._hook(i, unit)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._hook(i, unit)))

    def remove(self, model: nn.Module) -> None:
        """Detach from ``model``: hooks off, the backbone's ``requires_grad`` flags restored, the module deleted."""
        model = _unwrap(model)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        params = dict(model.named_parameters())
        for name, flag in self._requires_grad.items():
            if name in params:
                params[name].requires_grad_(flag)
        if getattr(model, ATTRIBUTE, None) is self:
            delattr(model, ATTRIBUTE)

    # ---- the path state -------------------------------------------------------------------------
    def alphas(self) -> list[nn.Parameter]:
        return [u.alpha for u in self.units]

    @torch.no_grad()
    def add_coupling_gradients(self) -> None:
        """Split LBI: alpha's gradient also carries (alpha - Gamma) / nu (once per optimizer step)."""
        for state in self.units:
            if state.alpha.grad is not None:
                state.alpha.grad.add_(ops.coupling_gradient(state.alpha.float(), state.gamma, self.config.nu))

    @torch.no_grad()
    def advance(self, lr: float, adam_step: int, beta1: float, record: bool) -> None:
        """One step of the ISS dynamics after an optimizer step with learning rate ``lr`` (float32 state)."""
        cfg = self.config
        eta = ops.adam_step_size(lr, adam_step, beta1, cfg.adam_bias_correction)
        t = float(self.time) + lr
        for state in self.units:
            alpha = state.alpha.detach().float()
            was_on = state.gamma != 0
            if cfg.coupling == "released":
                z, gamma = ops.released_update(state.z, state.gamma, alpha, eta, cfg.kappa, cfg.lam)
            else:
                z, gamma = ops.split_lbi_update(state.z, state.gamma, alpha, eta, cfg.kappa, cfg.lam, cfg.nu)
            state.z.copy_(z)
            state.gamma.copy_(gamma)
            on = ops.record_entries(state.gamma, was_on, state.first_entry, state.last_exit, t)
            if record:
                state.on_count.add_(on.to(torch.int32))
        self.time.fill_(t)
        self.steps.add_(1)
        if record:
            self.records.add_(1)

    @torch.no_grad()
    def set_masks(self, keep: dict[str, torch.Tensor]) -> None:
        """Set every alpha to a 0/1 keep-mask (``SolutionPath.masks_at`` output): the model is then masked."""
        for spec, state in zip(self.specs, self.units):
            state.alpha.copy_(keep[spec.name].reshape(spec.shape).to(state.alpha))

    def solution_path(self, model: nn.Module | None = None):
        """The path recorded so far, as a ``SolutionPath``."""
        from .path import SolutionPath

        tensors = {}
        for i, state in enumerate(self.units):
            for key in ("first_entry", "last_exit", "z", "gamma", "on_count"):
                tensors[f"{i}.{key}"] = getattr(state, key).detach().cpu().clone()
            tensors[f"{i}.alpha"] = state.alpha.detach().float().cpu().clone()
        search = {"steps": int(self.steps), "time": float(self.time), "records": int(self.records)}
        return SolutionPath("structured", [u.to_dict() for u in self.specs], tensors, self.config.to_dict(),
                            model_info(model) if model is not None else {}, search)


def model_info(model: nn.Module) -> dict:
    model = _unwrap(model)
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "model_type": getattr(config, "model_type", None),
            "name_or_path": getattr(config, "_name_or_path", None) or None}


def attach_masks(model: nn.Module, config: SPPConfig) -> SPPMasks:
    """Put SPP's masks on ``model`` (in place) and freeze its backbone: only the masks train.

    Do this before creating the ``Trainer``; pass ``hf_prune.callbacks.SolutionPathCallback()`` to it. The masks
    start at 1 (the model computes exactly what it did). ``SPPMasks.remove(model)`` undoes everything.
    """
    from ...engine.targets import check_model_ready

    if not isinstance(config, SPPConfig):
        raise TypeError(f"attach_masks needs an SPPConfig, got {type(config).__name__}.")
    check_model_ready(model)
    model = _unwrap(model)
    if SPPMasks.find(model) is not None:
        raise ValueError(f"{type(model).__name__} already carries SPP masks; call SPPMasks.find(model).remove(model) "
                         "first.")
    units = build_units(model, config)
    device = next(model.parameters()).device
    masks = SPPMasks(config, units, device)
    masks._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, ATTRIBUTE, masks)
    masks._register(model)
    return masks
