"""Sparsity patterns and mask construction: pure tensor functions, no hooks, no models.

Convention: a *prune mask* is a bool tensor shaped like the weight, ``True`` where the weight is removed.
``N:M`` always means *keep N of every M consecutive weights along the input dimension* (NVIDIA's
meaning); 2:4 and 4:8 therefore remove exactly half of every group.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` or ``N:M`` (keep N of every M consecutive inputs)."""

    kind: str  # "unstructured" | "nm"
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: "str | Pattern") -> "Pattern":
        if isinstance(text, Pattern):
            return text
        if not isinstance(text, str):
            raise ValueError(f"pattern must be a string such as 'unstructured' or '2:4', got {text!r}.")
        if text.strip().lower() == "unstructured":
            return cls("unstructured")
        match = _NM.match(text)
        if not match:
            raise ValueError(
                f"pattern={text!r} is not understood; use 'unstructured' or 'N:M' (keep N of every M "
                "consecutive inputs), e.g. '2:4' or '4:8'.")
        n, m = int(match.group(1)), int(match.group(2))
        if m < 2 or n < 1 or n >= m:
            raise ValueError(
                f"pattern={text!r} is invalid: N:M keeps N of every M inputs, so it needs 1 <= N < M "
                f"(got N={n}, M={m}); e.g. '2:4' or '4:8'.")
        return cls("nm", n, m)

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    @property
    def sparsity(self) -> float:
        """The fraction an N:M pattern removes (``1 - N/M``)."""
        return 1.0 - self.n / self.m if self.is_nm else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def prune_count(numel: int, sparsity: float) -> int:
    """Number of weights to remove out of ``numel`` for ``sparsity`` (nearest integer, halves up)."""
    return min(numel, max(0, int(math.floor(sparsity * numel + 0.5))))


def smallest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune mask with exactly ``k`` True entries at the ``k`` smallest scores of the whole tensor.

    Uses a k-th value threshold plus explicit tie filling, so it needs no full argsort of a large matrix.
    """
    flat = scores.reshape(-1)
    numel = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= numel:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(k).values
    mask = flat < threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = torch.nonzero(flat == threshold, as_tuple=False).squeeze(1)[:need]
        mask[ties] = True
    return mask.view_as(scores)


def smallest_k_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune mask with exactly ``k`` True entries in every row (the ``k`` smallest scores of the row)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= scores.shape[1]:
        return torch.ones_like(mask)
    idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
    return mask.scatter_(1, idx, True)


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune mask keeping the ``n`` largest scores of every ``m`` consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the input width to be a multiple of {m}; got {cols}.")
    grouped = scores.reshape(rows, cols // m, m)
    idx = torch.topk(grouped, m - n, dim=2, largest=False, sorted=False).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def mask_from_scores(scores: torch.Tensor, sparsity: float, pattern: Pattern, *, scope: str = "row") -> torch.Tensor:
    """Prune mask from importance scores (higher = keep).

    ``scope`` is where an unstructured budget is met exactly: ``"row"`` (each output row loses the same
    number of weights, Wanda's rule) or ``"matrix"`` (one threshold for the whole weight).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}.")
    if pattern.is_nm:
        return nm_prune_mask(scores, pattern.n, pattern.m)
    if scope == "row":
        return smallest_k_per_row(scores, prune_count(scores.shape[1], sparsity))
    if scope == "matrix":
        return smallest_k_mask(scores, prune_count(scores.numel(), sparsity))
    raise ValueError(f"scope={scope!r} is not supported; choose 'row' or 'matrix'.")


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of M-groups (along the input dimension) holding more than N non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return rows * math.ceil(cols / m)
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(dim=2)
    return int((nonzero > n).sum())


def _adapter_submodules(model: torch.nn.Module) -> set[int]:
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


def sparsity_of(tensor: torch.Tensor) -> float:
    return float((tensor == 0).sum()) / max(1, tensor.numel())


# --------------------------------------------------------------------------------------------------
# keeping pruned weights pruned while training


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
        adapter_parts = _adapter_submodules(base)
        if modules is None:
            from .architectures import get_adapter
            from .methods.layerwise import linear_candidates

            inside = {name for name, *_ in linear_candidates(base, get_adapter(base).stages(base))}
        masks = {}
        for name, module in base.named_modules():
            if not isinstance(module, torch.nn.Linear) or id(module) in adapter_parts:
                continue
            plain = name.replace(".base_layer", "")
            if modules is not None:
                if plain not in modules:
                    continue
            elif name not in inside or not bool((module.weight == 0).any()):
                continue
            masks[f"{plain}.weight"] = (module.weight.detach() != 0)
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
