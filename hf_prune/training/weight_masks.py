"""``WeightMasks``: keep pruned weights exactly zero while a pruned model trains (recovery fine-tuning, input
compensation with ``train_base="retained"``)."""

from __future__ import annotations

import torch

from ..engine.targets import linear_candidates
from ..models import get_family, is_linear_like


def _peft_submodules(model: torch.nn.Module) -> set[int]:
    """ids of the modules that PEFT tuner layers add (LoRA's ``lora_A``/``lora_B``...), not their base layer."""
    found: set[int] = set()
    for module in model.modules():
        get_base = getattr(module, "get_base_layer", None)
        if not callable(get_base):
            continue
        base = get_base()
        keep = {id(m) for m in base.modules()} if base is not module else set()
        found.update(id(m) for m in module.modules() if m is not module and id(m) not in keep)
    return found


class WeightMasks:
    """Keep-masks of pruned weights (``True`` = kept), captured from a pruned model's zeros.

    Used by training-time code (recovery fine-tuning, input compensation with ``train_base="retained"``)
    to keep every pruned weight exactly zero: mask the gradients before the optimizer step, zero the
    optimizer's moments at pruned positions, and re-apply the masks after the step (so neither weight decay nor
    momentum revives a pruned weight; N:M groups stay intact because the masks are fixed).

    Masks are keyed by parameter name; ``bind(model)`` finds the parameters again in a wrapped model too
    (a ``Trainer``/DDP ``module.`` prefix, PEFT's ``base_model.model.`` prefix and ``.base_layer.`` rename).
    """

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = {name: mask.bool() for name, mask in masks.items()}
        self._bound: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None
        self._bound_to: int | None = None

    @classmethod
    def from_model(cls, model: torch.nn.Module, modules: list[str] | None = None) -> "WeightMasks":
        """Masks of the ``nn.Linear`` weights inside the transformer blocks that hold zeros (what the pruners
        touch; embeddings and heads are left alone), or exactly those of ``modules`` (module names).

        ``model`` may be wrapped by PEFT (e.g. LoRA): the masks are then those of the frozen base weights (the
        adapters' own Linears are skipped) and are keyed by the plain names, so they bind to the PEFT model, to
        the model after ``merge_and_unload()`` and to the unwrapped model alike."""
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        peft_parts = _peft_submodules(base)
        fused: set[str] = set()  # fused MoE experts modules: their 3-D parameters are masked whole
        if modules is None:
            candidates = linear_candidates(base, get_family(base).stages(base))
            inside = {name for name, *_ in candidates}
            fused = {name.rsplit(".", 2)[0] for name, module, *_ in candidates if not is_linear_like(module)}
        masks = {}
        for name, module in base.named_modules():
            if not is_linear_like(module) or id(module) in peft_parts:
                continue
            plain = name.replace(".base_layer", "")
            if modules is not None:
                if plain not in modules:
                    continue
            elif name not in inside or not bool((module.weight == 0).any()):
                continue
            masks[f"{plain}.weight"] = (module.weight.detach() != 0)
        for owner in sorted(fused):
            for param_name in ("gate_up_proj", "down_proj"):
                param = getattr(base.get_submodule(owner), param_name)
                if bool((param == 0).any()):
                    masks[f"{owner}.{param_name}"] = param.detach() != 0
        if modules is not None and len(masks) != len(set(modules)):
            missing = sorted(set(modules) - {k[: -len(".weight")] for k in masks})
            raise ValueError(f"WeightMasks.from_model: no nn.Linear named {missing[0]!r} in the model.")
        return cls(masks)

    # ---- finding the parameters again ------------------------------------------------------------
    def bind(self, model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        if self._bound is not None and self._bound_to == id(model):
            return self._bound
        params = dict(model.named_parameters())
        bound = []
        for name, mask in self.masks.items():
            param = params.get(name)
            if param is None:
                variants = (name, name.replace(".weight", ".base_layer.weight"))
                hits = [p for n, p in params.items() if any(n == v or n.endswith("." + v) for v in variants)]
                if len(hits) != 1:
                    raise ValueError(f"WeightMasks: cannot find the parameter {name!r} in {type(model).__name__} "
                                     f"({'ambiguous' if hits else 'absent'}).")
                param = hits[0]
            if tuple(param.shape) != tuple(mask.shape):
                raise ValueError(f"WeightMasks: {name} has shape {tuple(param.shape)} but its mask "
                                 f"{tuple(mask.shape)}; the model changed shape since the masks were taken.")
            bound.append((param, mask.to(param.device)))
        self._bound, self._bound_to = bound, id(model)
        return bound

    # ---- the three operations ------------------------------------------------------------------
    @torch.no_grad()
    def apply_(self, model: torch.nn.Module) -> None:
        """Zero every pruned weight (after an optimizer step)."""
        for param, mask in self.bind(model):
            param.masked_fill_(~mask, 0)

    @torch.no_grad()
    def mask_grads_(self, model: torch.nn.Module) -> None:
        """Zero the gradients of pruned weights (before an optimizer step)."""
        for param, mask in self.bind(model):
            if param.grad is not None:
                param.grad.masked_fill_(~mask, 0)

    @torch.no_grad()
    def clean_optimizer_(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
        """Zero the optimizer state (Adam moments, momentum buffers) at pruned positions."""
        for param, mask in self.bind(model):
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.masked_fill_(~mask, 0)

    def violations(self, model: torch.nn.Module) -> int:
        """Number of pruned positions that are not exactly zero."""
        return sum(int((param[~mask] != 0).sum()) for param, mask in self.bind(model))

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / max(1, total)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.cpu() for name, mask in self.masks.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "WeightMasks":
        return cls(dict(state))
