"""The training-free variant (ours): one calibration pass through the block walker gives an unstructured
solution path for every targeted Linear (``ops.iss_weight_path``: an inverse-scale-space removal path driven
by RIA scores and corrected by the layer's exact reconstruction error), i.e. every sparsity at once.

The paper's LLM algorithm (its "Algorithm 2") is not public; this is hf_prune's own, documented as such. The
blocks are not changed during the pass (there is no single sparsity to prune at while building a whole family),
so every layer's statistics come from the dense model's activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...engine.report import RunMeter, module_kind
from ...engine.run import prepare
from ...engine.stats import LinearStats
from ...engine.targets import Target, select_modules
from ...errors import UnsupportedModelError
from ...models import Stage, get_family
from . import ops
from .config import SPPConfig
from .path import SolutionPath
from .units import model_info

GRAM = frozenset({"gram"})


class PathProcessor:
    """Block processor: the ISS weight path of each targeted Linear from its input Gram; blocks stay dense."""

    def __init__(self, config: SPPConfig, targets: list[Target]):
        self.config = config
        self.by_block: dict[str, list[Target]] = {}
        for t in targets:
            self.by_block.setdefault(t.block, []).append(t)
        self.ranks: dict[str, torch.Tensor] = {}
        self.curves: dict[str, torch.Tensor] = {}

    def statistics(self, block_name: str, block: nn.Module) -> dict[str, tuple[nn.Module, frozenset]]:
        return {t.name: (t.module, GRAM) for t in self.by_block.get(block_name, [])}

    def process(self, block_name: str, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        for t in self.by_block.get(block_name, []):
            rank, curve = ops.iss_weight_path(t.module.weight, stats[t.name].gram, alpha=self.config.alpha,
                                              step_fraction=self.config.step_fraction,
                                              correction=self.config.correction)
            self.ranks[t.name] = rank
            self.curves[t.name] = curve


def serves(model: nn.Module, config: SPPConfig | None = None) -> str | None:
    """Why SPP cannot prune ``model`` (None: it can): a path made here ranks ``nn.Linear`` weights only (a path
    given in ``config.path`` was checked against the model it is applied to)."""
    if config is not None and config.path is not None:
        return None
    config = config or SPPConfig()
    try:
        plan_path_targets(model, get_family(model).stages(model), config)
    except ValueError as exc:  # no Linear in the blocks, or Linear-like layers it cannot rank
        return str(exc)
    return None


def plan_path_targets(model: nn.Module, stages: list[Stage], config: SPPConfig) -> list[Target]:
    """The Linears ``config`` selects inside ``stages`` (their weights were checked finite by ``prepare``)."""
    selected = select_modules(model, stages, config.target_modules, config.exclude_modules)
    other = [(name, module) for name, module, *_ in selected if not isinstance(module, nn.Linear)]
    if other:
        kinds = sorted({"expert slices of fused MoE parameters" if type(m).__name__ == "ExpertSlice" else
                        type(m).__name__ for _, m in other})
        raise UnsupportedModelError(
            f"SPP's solution path ranks and applies nn.Linear weights only, but {len(other)} selected layers are "
            f"{' and '.join(kinds)} (e.g. {other[0][0]}); prune them with a layer-wise method (Wanda, SparseGPT, "
            "RIA, Magnitude), or leave them out with exclude_modules.")
    return [Target(name, module, block, stage, config.sparsity) for name, module, block, stage in selected]


def training_free_path(model: nn.Module, config: SPPConfig, calibration_dataset: Any = None, *, tokenizer: Any = None,
                       processor: Any = None, device: str | torch.device | None = None, progress: bool = True,
                       meter: RunMeter | None = None) -> tuple[SolutionPath, dict]:
    """Build the training-free solution path of ``model`` from calibration data (the model is not changed).

    Returns the path and the calibration provenance. ``calibration_dataset`` overrides ``config.calibration.dataset``.
    """
    run = prepare(model, device)
    targets = plan_path_targets(model, run.stages, config)
    run = run.for_targets(targets)
    meter = meter or RunMeter()
    path_processor = PathProcessor(config, targets)
    with meter.phase("calibration_data"):
        calibration = run.calibration(config.calibration, calibration_dataset, tokenizer=tokenizer,
                                      processor=processor)
    with meter.phase("solution_path"):
        run.walk(calibration.batches, path_processor, progress=progress, desc="spp path")
    units, tensors = [], {}
    for i, t in enumerate(targets):
        units.append({"name": t.name, "kind": module_kind(t.name), "block": t.block, "stage": t.stage,
                      "shape": list(t.module.weight.shape),
                      "cost": {"params": 1.0, "flops": 2.0, "entries": 1.0}})
        tensors[f"{i}.rank"] = path_processor.ranks[t.name]
        tensors[f"{i}.curve"] = path_processor.curves[t.name]
    search = {"kind": "training_free", "calibration": calibration.provenance, "alpha": config.alpha,
              "step_fraction": config.step_fraction, "correction": config.correction}
    if run.split:  # data-parallel: how the calibration batches were split across processes
        search["distributed"] = dict(run.split)
    return SolutionPath("unstructured", units, tensors, config.to_dict(), model_info(model), search), \
        calibration.provenance
