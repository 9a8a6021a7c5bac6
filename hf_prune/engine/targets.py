"""Target selection and model checks shared by every method: which Linears of which blocks, at which sparsity,
validated against the model before any weight changes."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import regex
import torch
from torch import nn

from ..errors import NonFiniteWeightsError, OffloadError, RegexTimeoutError, did_you_mean
from ..models import Stage, as_matrix, in_features, is_linear_like
from ..patterns import Pattern
from ..registry import method_specs
from .experts import ExpertSlice, expert_slices, is_router
from .offload import check_placement, is_dispatched, iter_tensors, module_weight, read_tensor


def offload_methods() -> list[str]:
    """The registered methods that prune accelerate-offloaded models."""
    return [spec.name for spec in method_specs() if spec.offload]


@dataclass
class Target:
    name: str
    module: nn.Module  # an nn.Linear or transformers' Conv1D (models.layers: as_matrix gives its [out, in] weight)
    block: str
    stage: str
    sparsity: float


REGEX_BUDGET_S = 0.2  # matching time one target/exclude regex may spend over all module names


class BoundedRegex:
    """A regex from a config file or the command line, matched against module names with a time bound: a
    catastrophically backtracking pattern (``(.*)(.*)(.*)\\3\\2\\1$``) is refused with a ``RegexTimeoutError``
    naming it instead of hanging the run. ``budget_s`` bounds the total over every name it is matched against."""

    def __init__(self, field: str, pattern: str, budget_s: float = REGEX_BUDGET_S):
        self.field, self.pattern = field, pattern
        self.compiled = regex.compile(pattern)
        self.budget_s = self.left = budget_s

    def search(self, name: str) -> bool:
        start = time.monotonic()
        try:
            return self.compiled.search(name, timeout=max(self.left, 1e-3)) is not None
        except TimeoutError:
            raise RegexTimeoutError(
                f"{self.field} regex {self.pattern!r} takes longer than {self.budget_s}s to match the module names "
                "(catastrophic backtracking: nested or repeated wildcards); use a plain pattern such as "
                "'q_proj|v_proj' or 'layers\\.0\\.'.") from None
        finally:
            self.left -= time.monotonic() - start


def linear_candidates(model: nn.Module, stages: list[Stage]) -> list[tuple[str, nn.Module, str, str]]:
    """(name, module, block name, stage name) of every linear-like layer (``nn.Linear``, transformers' ``Conv1D``)
    inside the blocks, in walk order, and of every expert's projections in fused experts modules
    (``engine.experts.ExpertSlice``, named ``<experts>.<index>.gate_up_proj``/``down_proj``). Routers stay out."""
    found = []
    for stage in stages:
        for block_name, block in zip(stage.block_names(model), stage.blocks(model)):
            parents = dict(block.named_modules(prefix=block_name))
            for sub, module in parents.items():
                if is_linear_like(module) and not is_router(sub, module, parents[sub.rsplit(".", 1)[0]]):
                    found.append((sub, module, block_name, stage.name))
            found += [(name, piece, block_name, stage.name) for name, piece in expert_slices(block, block_name)]
    return found


def target_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The ``[out, in]`` weight of the target called ``name``: a Linear's weight, a ``Conv1D``'s transposed view, or
    one expert's slice of a fused experts parameter (``<experts>.<index>.gate_up_proj``)."""
    try:
        return as_matrix(model.get_submodule(name))
    except AttributeError:
        owner, expert, param = name.rsplit(".", 2)
        return ExpertSlice(model.get_submodule(owner), param, int(expert)).weight


def stored_matrix(module: Any) -> torch.Tensor:
    """A target's ``[out, in]`` weight as stored, read from accelerate's weights map when it is offloaded."""
    if isinstance(module, ExpertSlice):
        return read_tensor(module.owner, module.param)[module.expert]
    return as_matrix(module, module_weight(module))


def select_modules(model: nn.Module, stages: list[Stage], target_modules: list[str] | None,
                   exclude_modules: list[str] | None) -> list[tuple[str, nn.Linear, str, str]]:
    """The candidate Linears that the target/exclude regexes select; each regex must match something."""
    candidates = linear_candidates(model, stages)
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer inside its blocks "
                         f"({', '.join(s.path for s in stages)}); the layer-wise pruners prune Linear layers only.")
    names = [c[0] for c in candidates]
    outside = [n for n, m in model.named_modules() if is_linear_like(m) and n not in set(names)]
    examples = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

    def check_matches(pattern: BoundedRegex) -> None:
        if any(pattern.search(n) for n in names):
            return
        hit = [n for n in outside if pattern.search(n)]
        extra = (f" It matches {', '.join(hit[:3])}, which lie outside the transformer blocks and are never "
                 "pruned by layer-wise methods." if hit else "")
        raise ValueError(f"{pattern.field} regex {pattern.pattern!r} matches no Linear layer inside the transformer "
                         f"blocks (e.g. {examples}).{extra}")

    selected = candidates
    if target_modules:
        targets = [BoundedRegex("target_modules", r) for r in target_modules]
        for pattern in targets:
            check_matches(pattern)
        selected = [c for c in selected if any(p.search(c[0]) for p in targets)]
    if exclude_modules:
        excludes = [BoundedRegex("exclude_modules", r) for r in exclude_modules]
        for pattern in excludes:
            check_matches(pattern)
        selected = [c for c in selected if not any(p.search(c[0]) for p in excludes)]
    if not selected:
        raise ValueError("target_modules/exclude_modules leave no module to prune.")
    return selected


def plan_targets(model: nn.Module, stages: list[Stage], config: Any) -> list[Target]:
    """Resolve the modules to prune and their sparsities (``config``: a layer-wise config's ``target_modules``,
    ``exclude_modules``, ``module_sparsity``, ``sparsity`` and ``pattern``), validating everything against the model."""
    selected = select_modules(model, stages, config.target_modules, config.exclude_modules)
    names = [c[0] for c in selected]
    overrides = config.module_sparsity or {}
    unknown = [n for n in overrides if n not in set(names)]
    if unknown:
        raise ValueError(f"module_sparsity names {unknown[0]!r}, which is not a module being pruned."
                         f"{did_you_mean(unknown[0], names)}")
    targets = [Target(n, m, b, s, overrides.get(n, config.sparsity)) for n, m, b, s in selected]
    pattern = Pattern.parse(config.pattern)
    if pattern.is_nm:
        bad = [f"{t.name} (in_features={in_features(t.module)})" for t in targets if in_features(t.module) % pattern.m]
        if bad:
            raise ValueError(f"pattern {pattern} needs every pruned layer's input width to be a multiple of "
                             f"{pattern.m}, but {len(bad)} are not: {', '.join(bad[:3])}. Exclude them with "
                             "exclude_modules or pick another pattern.")
    return targets


def check_model_ready(model: nn.Module, *, offload: bool = False) -> None:
    """A real model with real weights. ``offload=True``: accelerate CPU/disk offload is fine (the layer-wise
    engine writes pruned weights back into the weights maps); otherwise an offloaded model is refused."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Pruner needs a torch.nn.Module (a transformers model), got {type(model).__name__}.")
    if offload:
        check_placement(model)
        return
    if any(p.device.type == "meta" for p in model.parameters()):
        offloaded = is_dispatched(model)
        raise OffloadError(
            "some weights are on the 'meta' device (" + ("accelerate CPU/disk offload" if offloaded else
                                                          "an empty model") + "); this method needs every weight "
            "on a module: load the model with device_map=None (or 'cpu')"
            + (f", or prune offloaded models with {', '.join(offload_methods())}." if offloaded else "."))


def check_finite(model: nn.Module) -> None:
    """Refuse a model that holds NaN/inf in any parameter (offloaded ones read from their weights maps) or NaN in
    any buffer, naming the first such tensor and its dtype, before anything changes.

    Every tensor on the forward path counts, not only the ones a method targets: a NaN in a norm or an embedding
    would otherwise surface mid-walk, after earlier blocks were already pruned. Buffers are checked for NaN only,
    since an infinite buffer can be a legitimate mask value. Half precision is named as the likely cause only when
    the tensor is half precision."""
    parameters = ((n, p, lambda t: ~torch.isfinite(t)) for n, p in iter_tensors(model))  # one at a time
    buffers = ((n, b, torch.isnan) for n, b in model.named_buffers() if b.device.type != "meta")
    for name, tensor, bad in itertools.chain(parameters, buffers):
        if not tensor.is_floating_point():
            continue
        # one reduction per tensor: a finite float32 sum means no NaN/inf; only a non-finite sum (a bad value, or
        # an inf buffer, or a sum overflowing on finite values) is looked at entry by entry
        if bool(torch.isfinite(tensor.detach().sum(dtype=torch.float32))):
            continue
        count = int(bad(tensor.detach()).sum())
        if count:
            hint = " (try dtype=torch.float32)" if tensor.dtype in (torch.float16, torch.bfloat16) else ""
            raise NonFiniteWeightsError(
                f"{name} ({tensor.dtype}) holds {count} NaN/inf of its {tensor.numel()} values; the checkpoint is "
                f"corrupt or overflowed when loaded{hint}. Nothing was changed.")


def stages_with_targets(stages: list[Stage], targets: list[Target]) -> list[Stage]:
    names = {t.stage for t in targets}
    return [s for s in stages if s.name in names]


def calibration_needs(stages: list[Stage]) -> set[str]:
    return {key for s in stages for key in s.requires}
