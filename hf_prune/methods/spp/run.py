"""``Pruner.prune(SPPConfig(...))``: read a model off a saved path (``path=...``), or build the training-free
path from calibration data and read the model off it. Either way the report says which sparsity was read off,
in which budget, and what it removed per group and per block."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...engine import distributed
from ...engine.report import RunMeter, model_record, module_entry
from ...engine.run import RunContext, prepare
from ...engine.targets import linear_candidates
from ...models import Stage
from ...result import PruningResult
from ..layerwise import layerwise_report
from .config import SPPConfig
from .path import SolutionPath
from .training_free import plan_path_targets, training_free_path

NO_PATH = ("SPPConfig has no path: Pruner.prune reads a model off a saved solution path, so give "
           "path='folder-or-hub-id' (the search: hf_prune.methods.spp.attach_masks + SolutionPathCallback in a "
           "Trainer, then SolutionPath.save_pretrained). For a one-shot unstructured prune from calibration data use "
           "RIAConfig/WandaConfig/SparseGPTConfig, or opt in to SPP's experimental training-free path (ours) with "
           "training_free=True. Nothing was changed.")


def _linear_shapes(model: nn.Module, stages: list[Stage]) -> dict[str, tuple[int, int, int]]:
    """(out, in, numel) of every Linear inside the transformer blocks."""
    return {name: (m.out_features, m.in_features, m.weight.numel())
            for name, m, _, _ in linear_candidates(model, stages)}


def structured_report(run: RunContext, before: dict[str, tuple[int, int, int]], config: SPPConfig, meter: RunMeter,
                      params_before: int) -> dict:
    """Report of a structured read-off: per Linear, the share of its original weights removed (sliced out or
    zeroed); ``stored_*`` fields describe the tensor actually saved."""
    model = run.model
    entries, block_of = {}, {}
    for stage in run.stages:
        for block_name, block in zip(stage.block_names(model), stage.blocks(model)):
            for name, module in block.named_modules(prefix=block_name):
                if not isinstance(module, nn.Linear) or name not in before:
                    continue
                out_f, in_f, numel = before[name]
                stored = module_entry(module.weight.detach(), None, None)
                if stored["numel"] == numel and stored["zeros"] == 0:
                    continue  # untouched
                kept = stored["numel"] - stored["zeros"]
                entries[name] = {"shape": stored["shape"], "original_shape": [out_f, in_f], "numel": numel,
                                 "zeros": numel - kept, "achieved": (numel - kept) / max(1, numel),
                                 "stored_numel": stored["numel"], "stored_zeros": stored["zeros"]}
                block_of[name] = block_name
    params_after = sum(p.numel() for p in model.parameters())
    note = (f"Structured: {params_before - params_after:,} of {params_before:,} parameters were physically removed "
            f"({100 * (params_before - params_after) / max(1, params_before):.2f}%); the model stores "
            f"{params_after:,}. Removed heads, head dimensions and MLP neurons are gone from the tensors, so the model "
            "is smaller and faster on stock kernels. With rotary embeddings removed q-k/v-o dimensions stay as "
            "zeros (the rotary frequencies fix the head width). If the blocks kept different widths the folder holds "
            "hf_prune_layout.py: load it with trust_remote_code=True.")
    record = model_record(model, run.family.name, run.stages)
    record["name_or_path"] = getattr(model.config, "_name_or_path", None) or None  # the config's origin only
    parameters = {"before": params_before, "after": params_after,
                  "removed_fraction": (params_before - params_after) / max(1, params_before)}
    return run.report(config, pattern="structured", entries=entries, block_of=block_of, record=record,
                      calibration={"source": None, "note": "read off a saved solution path: no data"}, meter=meter,
                      sections={"parameters": parameters, "structured_note": note})


def run_spp(pruner: Any, config: SPPConfig, *, device: str | torch.device | None = None,
            progress: bool = True) -> PruningResult:
    if config.path is None and not config.training_free:
        raise ValueError(NO_PATH)
    model = pruner.model
    run = prepare(model, device)
    with RunMeter() as meter:
        if config.path is not None:
            with meter.phase("load_path"):
                path = SolutionPath.from_pretrained(config.path)
            path._check_model(model)  # before any change
            with meter.phase("read_off"):
                params_before = sum(p.numel() for p in model.parameters())
                before = _linear_shapes(model, run.stages)
                if path.kind == "structured":
                    path.materialize(model, config.sparsity, budget=config.budget, scope=config.scope, inplace=True)
                else:
                    path.apply(model, config.sparsity, budget=config.budget, scope=config.scope, inplace=True)
            provenance = {"source": None, "note": f"read off the solution path {config.path}"}
        else:
            path, provenance = training_free_path(model, config, tokenizer=pruner.tokenizer,
                                                  processor=pruner.processor, device=run.device, progress=progress,
                                                  meter=meter)
            with meter.phase("read_off"):
                path.apply(model, config.sparsity, inplace=True)
    if path.kind == "structured":
        report = structured_report(run, before, config, meter, params_before)
    else:
        targets = plan_path_targets(model, run.stages, config)
        report = layerwise_report(run.for_targets(targets), targets, config, {}, provenance, meter)
        report["pattern"] = "unstructured"
        if config.path is None:
            report["method_note"] = ("training-free SPP path (hf_prune's own variant, not the paper's unpublished LLM "
                                     "algorithm): one calibration pass ranks every weight; any sparsity reads off it")
    report["read_off"] = path.read_off(config.sparsity, config.budget, config.scope)
    if config.path is None and path.search.get("distributed"):  # the path was built here, data-parallel
        distributed.record_split(report, path.search["distributed"])
    report["solution_path"] = {"kind": path.kind, "units": len(path.units), "model": path.model, "search": path.search}
    allocation = {name: g["achieved"][report["read_off"]["budget"]]
                  for name, g in report["read_off"]["per_block"].items()} if path.kind == "structured" else None
    return PruningResult(config=config, report=report, model=model, allocation=allocation, path=path)
