"""Glue shared by the one-shot layer-wise pruners (Magnitude, Wanda, SparseGPT, RIA).

A layer-wise method is a ``LayerwiseConfig`` subclass that names the input statistics it needs and
implements ``prune_weight`` by calling its pure math in ``ops.py``. Everything else (which modules,
which sparsity for each, validation before any weight changes, calibration data, the block walk,
the report) is here, once.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..architectures import Stage, get_adapter
from ..calibration.data import CalibrationSet, build_calibration
from ..calibration.offload import check_placement, describe_offload, is_dispatched, module_weight
from ..calibration.stats import LinearStats
from ..calibration.walker import resolve_device, walk
from ..config import PrunerConfig, check_choice, check_number
from ..errors import HFPruneError, OffloadError, did_you_mean
from ..masks import Pattern
from ..report import RunMeter, environment, model_record, model_totals, module_entry, sparsity_section
from ..result import PruningResult


def _regex_list(owner: str, name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}.{name} must be a regex string or a non-empty list of them, got {value!r}.")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{owner}.{name}: {pattern!r} is not a valid regular expression ({exc}).") from None
    return list(value)


def _unwrap_allocation(value: Any) -> Any:
    """An ``Allocation`` (or its saved JSON dict) stands for its ``{module_name: sparsity}`` map."""
    inner = getattr(value, "module_sparsity", None)
    if isinstance(inner, dict):
        return inner
    if isinstance(value, dict) and isinstance(value.get("module_sparsity"), dict) and "sparsity" in value:
        return value["module_sparsity"]
    return value


@dataclass(kw_only=True)
class LayerwiseConfig(PrunerConfig, abc.ABC):
    """Fields every layer-wise pruner shares.

    - ``sparsity``: fraction of weights *removed* in each targeted Linear (default 0.5; implied by N:M).
    - ``pattern``: ``"unstructured"`` or ``"N:M"`` (keep N of every M consecutive inputs), e.g. ``"2:4"``.
    - ``target_modules`` / ``exclude_modules``: regexes searched in module names (``named_modules()``);
      by default every ``nn.Linear`` inside the transformer blocks is pruned (never embeddings/heads).
    - ``module_sparsity``: ``{module_name: sparsity}`` overrides, e.g. an allocation from ECoFLaP (an
      ``hf_prune.Allocation`` or the dict of a saved ``sparsity_allocation.json`` is taken as its map).
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    module_sparsity: dict[str, float] | None = None

    statistics: ClassVar[frozenset] = frozenset()  # what the method reads: "sq_norm", "gram"

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        pattern = Pattern.parse(self.pattern)
        self.pattern = str(pattern)
        if pattern.is_nm:
            if self.sparsity is None:
                self.sparsity = pattern.sparsity
            elif not isinstance(self.sparsity, (int, float)) or abs(self.sparsity - pattern.sparsity) > 1e-9:
                raise ValueError(
                    f"{owner}: pattern {pattern} removes exactly {pattern.sparsity:g} of every group, so "
                    f"sparsity={self.sparsity!r} contradicts it; leave sparsity out or set it to {pattern.sparsity:g}.")
            if self.module_sparsity:
                raise ValueError(f"{owner}: module_sparsity cannot be combined with pattern {pattern}, which fixes "
                                 "every module's sparsity; use pattern='unstructured'.")
        elif self.sparsity is None:
            self.sparsity = 0.5
        check_number(owner, "sparsity", self.sparsity, 0.0, 1.0)
        self.sparsity = float(self.sparsity)
        self.target_modules = _regex_list(owner, "target_modules", self.target_modules)
        self.exclude_modules = _regex_list(owner, "exclude_modules", self.exclude_modules)
        if self.module_sparsity is not None:
            self.module_sparsity = _unwrap_allocation(self.module_sparsity)
            if not isinstance(self.module_sparsity, dict):
                raise ValueError(f"{owner}.module_sparsity must be a dict {{module_name: sparsity}}, "
                                 f"got {type(self.module_sparsity).__name__}.")
            for name, value in self.module_sparsity.items():
                check_number(owner, f"module_sparsity[{name!r}]", value, 0.0, 1.0)
            self.module_sparsity = {str(k): float(v) for k, v in self.module_sparsity.items()}

    @abc.abstractmethod
    def prune_weight(self, weight: torch.Tensor, stats: LinearStats | None, sparsity: float,
                     pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Return ``(new_weight_fp32, prune_mask, info)`` for one Linear weight ``[out, in]`` (fp32);
        a method implements it with a call into its ``ops.py``."""


def check_scope(owner: str, scope: str) -> None:
    check_choice(owner, "scope", scope, ("row", "matrix"))


# --------------------------------------------------------------------------------------------
# which modules, at which sparsity


@dataclass
class Target:
    name: str
    module: nn.Linear
    block: str
    stage: str
    sparsity: float


def linear_candidates(model: nn.Module, stages: list[Stage]) -> list[tuple[str, nn.Linear, str, str]]:
    """(name, module, block name, stage name) of every nn.Linear inside the blocks, in walk order."""
    found = []
    for stage in stages:
        for block_name, block in zip(stage.block_names(model), stage.blocks(model)):
            for sub, module in block.named_modules(prefix=block_name):
                if isinstance(module, nn.Linear):
                    found.append((sub, module, block_name, stage.name))
    return found


def select_modules(model: nn.Module, stages: list[Stage], target_modules: list[str] | None,
                   exclude_modules: list[str] | None) -> list[tuple[str, nn.Linear, str, str]]:
    """The candidate Linears that the target/exclude regexes select; each regex must match something."""
    candidates = linear_candidates(model, stages)
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer inside its blocks "
                         f"({', '.join(s.path for s in stages)}); the layer-wise pruners prune Linear layers only.")
    names = [c[0] for c in candidates]
    outside = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in set(names)]
    examples = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

    def check_matches(field: str, regex: str) -> None:
        if any(re.search(regex, n) for n in names):
            return
        hit = [n for n in outside if re.search(regex, n)]
        extra = (f" It matches {', '.join(hit[:3])}, which lie outside the transformer blocks and are never "
                 "pruned by layer-wise methods." if hit else "")
        raise ValueError(f"{field} regex {regex!r} matches no Linear layer inside the transformer blocks "
                         f"(e.g. {examples}).{extra}")

    selected = candidates
    if target_modules:
        for regex in target_modules:
            check_matches("target_modules", regex)
        selected = [c for c in selected if any(re.search(r, c[0]) for r in target_modules)]
    if exclude_modules:
        for regex in exclude_modules:
            check_matches("exclude_modules", regex)
        selected = [c for c in selected if not any(re.search(r, c[0]) for r in exclude_modules)]
    if not selected:
        raise ValueError("target_modules/exclude_modules leave no module to prune.")
    return selected


def plan_targets(model: nn.Module, stages: list[Stage], config: LayerwiseConfig) -> list[Target]:
    """Resolve the modules to prune and their sparsities, validating everything against the model."""
    selected = select_modules(model, stages, config.target_modules, config.exclude_modules)
    names = [c[0] for c in selected]
    overrides = config.module_sparsity or {}
    unknown = [n for n in overrides if n not in set(names)]
    if unknown:
        raise ValueError(f"module_sparsity names {unknown[0]!r}, which is not a module being pruned."
                         f"{did_you_mean(unknown[0], names)}")
    targets = [Target(n, m, b, s, overrides.get(n, config.sparsity)) for n, m, b, s in selected]
    for t in targets:
        if not bool(torch.isfinite(module_weight(t.module)).all()):  # offloaded: read from its weights map
            raise ValueError(f"{t.name} holds NaN/inf weights; the checkpoint is corrupt or overflowed when loaded "
                             "(try dtype=torch.float32). Nothing was pruned.")
    pattern = Pattern.parse(config.pattern)
    if pattern.is_nm:
        bad = [f"{t.name} (in_features={t.module.in_features})" for t in targets if t.module.in_features % pattern.m]
        if bad:
            raise ValueError(f"pattern {pattern} needs every pruned layer's input width to be a multiple of "
                             f"{pattern.m}, but {len(bad)} are not: {', '.join(bad[:3])}. Exclude them with "
                             "exclude_modules or pick another pattern.")
    return targets


OFFLOAD_METHODS = ("magnitude", "wanda", "sparsegpt", "ria")


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
            + (f", or prune offloaded models with {', '.join(OFFLOAD_METHODS)}." if offloaded else "."))


# --------------------------------------------------------------------------------------------
# the block processor and the run


class LayerwiseProcessor:
    def __init__(self, config: LayerwiseConfig, targets: list[Target]):
        self.config = config
        self.pattern = Pattern.parse(config.pattern)
        self.by_block: dict[str, list[Target]] = {}
        for t in targets:
            self.by_block.setdefault(t.block, []).append(t)
        self.info: dict[str, dict] = {}

    def statistics(self, block_name: str, block: nn.Module) -> dict[str, tuple[nn.Module, frozenset]]:
        if not self.config.statistics:
            return {}
        return {t.name: (t.module, self.config.statistics) for t in self.by_block.get(block_name, [])}

    def process(self, block_name: str, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        for t in self.by_block.get(block_name, []):
            weight = t.module.weight
            new, prune, info = self.config.prune_weight(weight.detach().to(torch.float32), stats.get(t.name),
                                                        t.sparsity, self.pattern)
            new = new.to(weight.dtype)
            new[prune] = 0
            weight.data.copy_(new)
            self.info[t.name] = info

    def state_dict(self) -> dict:  # what a checkpoint keeps: the per-module info the report shows
        return {"info": self.info}

    def load_state_dict(self, state: dict | None) -> None:
        self.info = dict((state or {}).get("info", {}))


def stages_with_targets(stages: list[Stage], targets: list[Target]) -> list[Stage]:
    names = {t.stage for t in targets}
    return [s for s in stages if s.name in names]


def calibration_needs(stages: list[Stage]) -> set[str]:
    return {key for s in stages for key in s.requires}


def run_layerwise(pruner: Any, config: LayerwiseConfig, *, device: str | torch.device | None = None,
                  progress: bool = True, calibration: CalibrationSet | None = None,
                  checkpoint: Any = None) -> PruningResult:
    """Prune ``pruner.model`` in place with a layer-wise method and report what was done.

    ``calibration``: batches already built from ``config.calibration`` (an allocator that validated its
    data up front passes them); by default they are built here. ``checkpoint``: an
    ``hf_prune.checkpoint.RunCheckpoint`` to save after every block and to resume from."""
    model = pruner.model
    check_model_ready(model, offload=True)
    adapter = get_adapter(model)
    stages = adapter.stages(model)
    targets = plan_targets(model, stages, config)
    active = stages_with_targets(stages, targets)
    exec_device = resolve_device(model, device)
    processor = LayerwiseProcessor(config, targets)
    with RunMeter() as meter:
        batches, provenance = None, {"source": None, "note": "data-free: the method reads no activations"}
        if config.statistics:
            with meter.phase("calibration_data"):
                if calibration is None:
                    calibration = build_calibration(config.calibration, tokenizer=pruner.tokenizer,
                                                    processor=pruner.processor, needs=calibration_needs(active),
                                                    causal_lm=adapter.causal_lm)
            batches, provenance = calibration.batches, calibration.provenance
        resumed_from = None
        if checkpoint is not None:
            with meter.phase("checkpoint_fingerprints"):
                checkpoint.begin(model, config, batches, active)  # refuses another model/config/data
            resumed_from = checkpoint.state.get("position")
        with meter.phase("walk_and_prune"):
            try:
                walk(model, active, batches, processor, device=exec_device, progress=progress, desc=config.method,
                     checkpoint=checkpoint)
            except HFPruneError as exc:
                if processor.info:
                    raise type(exc)(f"{exc} Note: {len(processor.info)} of {len(targets)} modules were already "
                                    "pruned in place before this failure; reload the model before retrying.") from exc
                raise
    report = layerwise_report(model, adapter.name, active, targets, config, processor.info, provenance, meter,
                              exec_device)
    if checkpoint is not None:
        checkpoint.finish()
        report["run"]["checkpoint"] = {"folder": checkpoint.folder, "resumed_after": resumed_from}
    return PruningResult(config=config, report=report, model=model)


def layerwise_report(model: nn.Module, family: str, stages: list[Stage], targets: list[Target],
                     config: PrunerConfig, info: dict[str, dict], provenance: dict, meter: RunMeter,
                     device: torch.device) -> dict:
    pattern = Pattern.parse(getattr(config, "pattern", "unstructured"))
    entries = {}
    for t in targets:
        entry = module_entry(module_weight(t.module).detach(), t.sparsity, pattern)
        entry.update({k: v for k, v in info.get(t.name, {}).items()})
        entries[t.name] = entry
    record = model_record(model, family, stages)
    offload = describe_offload(model)
    if offload:
        record["offload"] = offload
    return {
        "method": config.method,
        "config": config.to_dict(),
        "pattern": str(pattern),
        "model": record,
        "calibration": provenance,
        "sparsity": sparsity_section(entries, {t.name: t.block for t in targets}),
        "model_totals": model_totals(model),
        "run": meter.to_dict(),
        "environment": environment(device),
    }
