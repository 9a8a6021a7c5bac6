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

import math

import torch
from torch import nn

from ...engine.targets import check_model_ready
from . import ops
from .config import SPPConfig
from .path import SolutionPath
from .units import ATTRIBUTE, MaskUnit, build_units, model_info, unwrap

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
        masks = getattr(unwrap(model), ATTRIBUTE, None)
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
        model = unwrap(model)
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
        """hf_prune's Split LBI discretisation: alpha's gradient also carries (alpha - Gamma) / nu (once per
        optimizer step, so the optimizer normalises it with the task gradient)."""
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
        tensors = {}
        for i, state in enumerate(self.units):
            for key in ("first_entry", "last_exit", "z", "gamma", "on_count"):
                tensors[f"{i}.{key}"] = getattr(state, key).detach().cpu().clone()
            tensors[f"{i}.alpha"] = state.alpha.detach().float().cpu().clone()
        search = {"steps": int(self.steps), "time": float(self.time), "records": int(self.records)}
        return SolutionPath("structured", [u.to_dict() for u in self.specs], tensors, self.config.to_dict(),
                            model_info(model) if model is not None else {}, search)


def attach_masks(model: nn.Module, config: SPPConfig) -> SPPMasks:
    """Put SPP's masks on ``model`` (in place) and freeze its backbone: only the masks train.

    Do this before creating the ``Trainer``; pass ``hf_prune.callbacks.SolutionPathCallback()`` to it. The masks
    start at 1 (the model computes exactly what it did). ``SPPMasks.remove(model)`` undoes everything.
    """
    if not isinstance(config, SPPConfig):
        raise TypeError(f"attach_masks needs an SPPConfig, got {type(config).__name__}.")
    check_model_ready(model)
    model = unwrap(model)
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
