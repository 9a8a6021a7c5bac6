"""ECoFLaP glue: plan and validate, score (stage 1), allocate, then the layer-wise engine (stage 2).

``allocate`` runs stage 1 alone and returns an ``Allocation`` without changing any weight; ``run_ecoflap``
validates everything (targets, both calibration sets, the loss) before scoring, then prunes through
``run_layerwise`` with the allocation as ``module_sparsity``: the one block walker, no second loop.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ...allocation import Allocation
from ...calibration.data import CalibrationSet
from ...engine import distributed
from ...engine.report import RunMeter
from ...engine.run import prepare
from ...engine.targets import Target, plan_targets, stages_with_targets
from ...engine.walker import model_device, resolve_device
from ...errors import HFPruneError
from ...models import Family, Stage
from ...result import PruningResult
from ...version import __version__
from ..layerwise import LayerwiseConfig, run_layerwise
from .config import ECoFLaPConfig
from .losses import ScoringLoss, check_batches, choose_loss, describe
from .ops import min_keep, solve_budget, split_keep
from .scores import Unit, first_order_scores, sign_design, zeroth_order_scores, zeroth_order_sums


@dataclass
class Plan:
    """Everything validated before any weight is touched."""

    family: Family
    stages: list[Stage]
    targets: list[Target]
    layer_config: LayerwiseConfig
    score_data: CalibrationSet
    prune_data: CalibrationSet | None
    loss: ScoringLoss
    score_device: torch.device


def group_of(target: Target, granularity: str) -> str:
    return {"layer": target.name, "block": target.block, "submodel": target.stage}[granularity]


def make_plan(pruner: Any, config: ECoFLaPConfig, *, with_prune_data: bool) -> Plan:
    if not isinstance(config, ECoFLaPConfig):
        raise TypeError(f"ECoFLaP needs an ECoFLaPConfig, got {type(config).__name__}.")
    model = pruner.model
    run = prepare(model)  # stage 1 scores where the weights are (Plan.score_device); stage 2 picks its device
    family, stages = run.family, run.stages
    layer_config = config.layer_pruner_config()
    targets = plan_targets(model, stages, layer_config)
    score_cal = dataclasses.replace(config.calibration, num_samples=config.num_score_samples)
    if config.zo_stop_tol is not None and config.score == "zeroth_order":  # a round is whole batches
        score_cal = dataclasses.replace(score_cal, batch_size=min(score_cal.batch_size, config.zo_round_samples))
    # stage 1 runs the whole model: its data feeds every stage
    score_data = run.calibration(score_cal, tokenizer=pruner.tokenizer, processor=pruner.processor)
    prune_data = None
    if with_prune_data and layer_config.statistics:
        prune_data = run.for_targets(targets).calibration(config.calibration, tokenizer=pruner.tokenizer,
                                                          processor=pruner.processor)
    loss = choose_loss(model, family, score_data.batches[0])
    check_batches(loss, score_data.batches)
    if config.granularity == "submodel" and (config.per_submodel_budget or len(stages) == 1):
        warnings.warn("ECoFLaP with granularity='submodel' and one budget per sub-model (or a single sub-model) has "
                      "one group per budget: every module gets the target sparsity (a uniform allocation).",
                      stacklevel=3)
    return Plan(family, stages, targets, layer_config, score_data, prune_data, loss, model_device(model))


def _summed(score: Any) -> dict[str, float]:
    """``score()`` on this rank's share, added up across ranks; a failure on any rank is raised on every rank."""
    partial, failure = {}, None
    try:
        partial = score()
    except HFPruneError as exc:  # NaN/inf on one share: every rank stops, none waits in the sum
        failure = exc
    distributed.agree(failure)
    return distributed.reduce_floats(partial)


def _batch_samples(batch: dict) -> int:
    """How many samples a calibration batch holds (its first tensor's leading dimension)."""
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def _rounds(batches: list[dict], round_samples: int) -> list[tuple[int, int]]:
    """Consecutive runs of whole batches holding at least ``round_samples`` samples each (the last may hold fewer)."""
    bounds, start, held = [], 0, 0
    for i, batch in enumerate(batches):
        held += _batch_samples(batch)
        if held >= round_samples:
            bounds.append((start, i + 1))
            start, held = i + 1, 0
    if start < len(batches):
        bounds.append((start, len(batches)))
    return bounds


def _zo_units(config: ECoFLaPConfig, groups: dict[str, list[Target]]) -> list[Unit]:
    if config.zo_perturb == "block":
        return [Unit(group, group, [t.module.weight for t in ts]) for group, ts in groups.items()]
    return [Unit(t.name, group, [t.module.weight]) for group, ts in groups.items() for t in ts]


def _unit_passes(config: ECoFLaPConfig, units: list[Unit], blocks: list, label_free: bool) -> int:
    """Perturbed forward passes per batch and direction."""
    if label_free:
        return len(units)
    if config.zo_perturb != "design":
        return 2 * len(units)
    owner = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    sizes: dict = {}
    for unit in units:
        key = owner.get(id(unit.params[0]), ("alone", unit.name))
        sizes[key] = sizes.get(key, 0) + 1
    return sum(len(sign_design(m)) for m in sizes.values())


def _group_scores(pruner: Any, config: ECoFLaPConfig, plan: Plan, groups: dict[str, list[Target]],
                  progress: bool) -> tuple[dict[str, float], dict, dict | None]:
    """Raw score per group. Under several processes each rank scores its contiguous share of the batches (the
    perturbation seeds follow the global batch index) and the per-rank sums are added across ranks. With
    ``zo_stop_tol`` the batches are scored in rounds (see ``_zeroth_order_rounds``); the third value records them."""
    model, loss, batches = pruner.model, plan.loss, plan.score_data.batches
    lo, hi = distributed.shard_range(len(batches))
    share, show = batches[lo:hi], progress and distributed.is_main()
    seed = config.calibration.seed
    blocks = [block for stage in plan.stages for block in stage.blocks(model)]
    stopping = None
    if config.score == "zeroth_order":
        units = _zo_units(config, groups)
        design = config.zo_perturb == "design"
        if config.zo_stop_tol is None:
            unit_scores = _summed(lambda: zeroth_order_scores(
                model, units, share, loss, eps=config.zo_eps, num_noise=config.zo_num_noise, seed=seed,
                device=plan.score_device, progress=show, batch_offset=lo, total_batches=len(batches), blocks=blocks,
                design=design))
            used = len(batches)
        else:
            unit_scores, used, stopping = _zeroth_order_rounds(model, config, plan, groups, units, blocks, design,
                                                                 show)
        raw = {group: 0.0 for group in groups}
        for unit in units:
            raw[unit.group] += unit_scores[unit.name]
        per_batch = _unit_passes(config, units, blocks, loss.label_free) * config.zo_num_noise + 1
        passes = {"forward": used * per_batch, "backward": 0, "perturbation_units": len(units),
                  "note": "one unperturbed forward per batch records the blocks' outputs; a perturbed pass replays "
                          "those of the blocks before the perturbed one"}
        if design and not loss.label_free:
            passes["design"] = ("the Linears of a block perturbed together with the signs of a Hadamard matrix of "
                                "order n (the smallest power of two above their count): n passes per block and "
                                "direction, each Linear's estimate read off the signed sum")
    else:
        weights = {t.name: t.module.weight for ts in groups.values() for t in ts}
        tensor_scores = _summed(lambda: first_order_scores(
            model, weights, share, loss, seed=seed, device=plan.score_device, progress=show, blocks=blocks,
            batch_offset=lo, total_batches=len(batches)))
        raw = {group: sum(tensor_scores[t.name] for t in ts) for group, ts in groups.items()}
        passes = {"forward": len(batches), "backward": len(batches), "block_recomputations": len(batches)}
    return raw, passes, stopping


def _zeroth_order_rounds(model: Any, config: ECoFLaPConfig, plan: Plan, groups: dict[str, list[Target]],
                         units: list[Unit], blocks: list, design: bool,
                         progress: bool) -> tuple[dict[str, float], int, dict]:
    """Early stopping: score ``zo_round_samples`` samples at a time (each round's batches split across ranks and
    its sums added across ranks, so every rank holds the same totals), solve the allocation from the running means
    after each round, and stop once at least ``zo_min_samples`` samples are scored and no group's sparsity moved
    by more than ``zo_stop_tol`` since the previous round (or when the ``num_score_samples`` are used up). The
    decision reads only all-reduced values: every rank stops after the same round."""
    loss, batches = plan.loss, plan.score_data.batches
    totals = {unit.name: 0.0 for unit in units}
    rounds, previous, used, samples, reason = [], None, 0, 0, "maximum"
    for start, stop in _rounds(batches, config.zo_round_samples):
        # a round with fewer batches than ranks leaves some idle (the rounds, hence the result, do not depend on the
        # number of processes); zo_round_samples >= processes x batch size keeps every rank busy
        lo, hi = distributed.shard_bounds(stop - start, distributed.world_size())[distributed.rank()]
        share = batches[start + lo:start + hi]
        sums = _summed(lambda: zeroth_order_sums(
            model, units, share, loss, eps=config.zo_eps, num_noise=config.zo_num_noise, seed=config.calibration.seed,
            device=plan.score_device, progress=progress, batch_offset=start + lo, blocks=blocks, design=design))
        for name, value in sums.items():
            totals[name] += value
        used, samples = stop, samples + sum(_batch_samples(b) for b in batches[start:stop])
        count = used * config.zo_num_noise
        raw = {group: 0.0 for group in groups}
        for unit in units:
            raw[unit.group] += totals[unit.name] / count
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an all-zero round warns once, from the final allocation
            sparsity = {g: e["sparsity"] for g, e in solve_allocation(config, groups, raw).groups.items()}
        change = None if previous is None else max(abs(sparsity[g] - previous[g]) for g in sparsity)
        rounds.append({"samples": samples, "batches": used, "max_sparsity_change": change})
        previous = sparsity
        if change is not None and samples >= config.zo_min_samples and change <= config.zo_stop_tol:
            reason = "converged"
            break
    count = used * config.zo_num_noise
    record = {"tol": config.zo_stop_tol, "round_samples": config.zo_round_samples,
              "min_samples": config.zo_min_samples, "max_samples": config.num_score_samples,
              "samples_used": samples, "batches_used": used, "rounds": rounds, "stopped": reason,
              "rule": "stop after the first round, at or after min_samples, where no group's sparsity changed by "
                      "more than tol since the previous round"}
    return {name: total / count for name, total in totals.items()}, used, record


def allocate(pruner: Any, config: ECoFLaPConfig, *, device: str | torch.device | None = None,
             progress: bool = True, plan: Plan | None = None) -> Allocation:
    """ECoFLaP stage 1: score the groups and solve the allocation. Every weight is left as it was.

    ``device`` is accepted for symmetry with ``Pruner.prune``: stage 1 runs whole forward (and, first order,
    backward) passes where the model's weights are; put the model on an accelerator to score there.
    """
    plan = plan or make_plan(pruner, config, with_prune_data=False)
    groups: dict[str, list[Target]] = {}
    for t in plan.targets:
        groups.setdefault(group_of(t, config.granularity), []).append(t)
    with RunMeter() as meter:
        with meter.phase("scores"):
            raw, passes, stopping = _group_scores(pruner, config, plan, groups, progress)
        with meter.phase("allocation"):
            allocation = solve_allocation(config, groups, raw)
    allocation.provenance.update({
        "loss": describe(plan.loss),
        "num_score_samples": config.num_score_samples,
        "calibration": plan.score_data.provenance,
        "seed": config.calibration.seed,
        "passes": passes,
        **({"early_stopping": stopping} if stopping is not None else {}),
        "score_device": str(plan.score_device),
        "run": meter.to_dict(),
    })
    split = distributed.split_record(len(plan.score_data.batches))
    if split is not None:  # data-parallel scoring: how the score batches were split
        allocation.provenance["distributed"] = split
    return allocation


def solve_allocation(config: ECoFLaPConfig, groups: dict[str, list[Target]], raw: dict[str, float]) -> Allocation:
    """Group scores -> per-group keep counts per budget -> per-module sparsities (pure bookkeeping)."""
    sizes = {g: sum(t.module.weight.numel() for t in ts) for g, ts in groups.items()}
    floors = {g: sum(min_keep(t.module.weight.numel(), config.max_sparsity) for t in ts) for g, ts in groups.items()}
    score = {g: raw[g] / sizes[g] if config.aggregate == "mean" else raw[g] for g in groups}
    budget_of = {g: (ts[0].stage if config.per_submodel_budget else "global") for g, ts in groups.items()}
    entries: dict[str, dict] = {}
    budgets: dict[str, dict] = {}
    module_sparsity: dict[str, float] = {}
    for budget in dict.fromkeys(budget_of.values()):
        names = [g for g in groups if budget_of[g] == budget]
        if not any(score[g] > 0 for g in names):
            warnings.warn(f"every ECoFLaP score in budget {budget!r} is zero (the loss does not depend on these "
                          "weights on the calibration data); their allocation is uniform.", stacklevel=3)
        solution = solve_budget([score[g] for g in names], [sizes[g] for g in names], config.sparsity,
                                config.max_sparsity, floors=[floors[g] for g in names])
        for g, keep, saturated in zip(names, solution.keep, solution.saturated):
            entries[g] = {"modules": [t.name for t in groups[g]], "stage": groups[g][0].stage, "budget": budget,
                          "size": sizes[g], "raw_score": raw[g], "score": score[g], "keep": keep,
                          "sparsity": 1.0 - keep / sizes[g], "saturated": saturated}
        size = sum(sizes[g] for g in names)
        kept = sum(solution.keep)
        budgets[budget] = {"groups": names, "size": size, "budget_keep": solution.budget, "keep": kept,
                           "target": config.sparsity, "allocated": 1.0 - kept / size}
    for g, ts in groups.items():
        numels = [t.module.weight.numel() for t in ts]
        keeps = split_keep(entries[g]["keep"], numels, [min_keep(n, config.max_sparsity) for n in numels])
        for t, n, k in zip(ts, numels, keeps):
            module_sparsity[t.name] = 1.0 - k / n
    order = [t.name for ts in groups.values() for t in ts]
    provenance = {
        "method": "ecoflap", "hf_prune_version": __version__, "score": config.score, "aggregate": config.aggregate,
        "granularity": config.granularity, "per_submodel_budget": config.per_submodel_budget,
        "zo_eps": config.zo_eps if config.score == "zeroth_order" else None,
        "zo_num_noise": config.zo_num_noise if config.score == "zeroth_order" else None,
        "zo_perturb": config.zo_perturb if config.score == "zeroth_order" else None,
        "first_order_score": "sum |W| * |dL/dW|, mean over batches" if config.score == "first_order" else None,
        "layer_pruner": config.layer_pruner,
    }
    return Allocation(module_sparsity={n: module_sparsity[n] for n in order}, sparsity=config.sparsity,
                      max_sparsity=config.max_sparsity, groups=entries, budgets=budgets, provenance=provenance)


def _merge_runs(first: dict, second: dict) -> dict:
    peaks = [r.get("peak_rss_bytes") for r in (first, second) if r.get("peak_rss_bytes")]
    cuda = [r.get("peak_cuda_bytes") for r in (first, second) if r.get("peak_cuda_bytes")]
    return {
        "time_s": round(first["time_s"] + second["time_s"], 4),
        "phases_s": {**{f"allocation.{k}": v for k, v in first["phases_s"].items()}, **second["phases_s"]},
        "peak_rss_bytes": max(peaks) if peaks else None,
        "peak_rss_scope": second.get("peak_rss_scope"),
        "peak_cuda_bytes": max(cuda) if cuda else None,
        **({"checkpoint": second["checkpoint"]} if "checkpoint" in second else {}),
        **({"distributed": second["distributed"]} if "distributed" in second else {}),
    }


def run_ecoflap(pruner: Any, config: ECoFLaPConfig, *, device: str | torch.device | None = None,
                progress: bool = True, checkpoint: Any = None) -> PruningResult:
    """Stage 1 (allocation) then stage 2 (``config.layer_pruner`` through the layer-wise engine).

    ``checkpoint`` (``hf_prune.checkpoint.RunCheckpoint``): the allocation is saved in it once stage 1 is done
    (a resume reuses it and skips the scoring), then stage 2 checkpoints after every block."""
    start = time.perf_counter()
    plan = make_plan(pruner, config, with_prune_data=True)
    resolve_device(pruner.model, device)  # a bad device fails before stage 1 scores
    planned = time.perf_counter() - start  # targets, both calibration sets and the loss, validated
    saved = None
    if checkpoint is not None:
        checkpoint.begin(pruner.model, config, plan.score_data.batches + (plan.prune_data.batches if plan.prune_data
                                                                          else []),
                         stages_with_targets(plan.stages, plan.targets))
        saved = checkpoint.extra("allocation")
    if saved is not None:  # stage 1 finished before the interruption: the same allocation, no rescoring
        allocation = Allocation.from_dict(saved)
    else:
        allocation = allocate(pruner, config, device=device, progress=progress, plan=plan)
        if checkpoint is not None:
            checkpoint.save_extra("allocation", allocation.to_dict())
    run = allocation.provenance["run"]
    run["phases_s"] = {"plan": round(planned, 4), **run["phases_s"]}
    run["time_s"] = round(run["time_s"] + planned, 4)
    layer_config = config.layer_pruner_config(module_sparsity=allocation.module_sparsity)
    result = run_layerwise(pruner, layer_config, device=device, progress=progress, calibration=plan.prune_data,
                           checkpoint=checkpoint)
    report = result.report
    layer_dict = layer_config.to_dict()
    layer_dict["module_sparsity"] = "see allocation.module_sparsity"
    report.update({
        "method": config.method,
        "config": config.to_dict(),
        "layer_pruner": {"method": layer_config.method, "config": layer_dict},
        "allocation": allocation.to_dict(),
        "run": _merge_runs(allocation.provenance["run"], report["run"]),
    })
    return PruningResult(config=config, report=report, model=pruner.model, allocation=allocation)
