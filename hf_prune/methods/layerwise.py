"""Glue shared by the one-shot layer-wise pruners (Magnitude, Wanda, SparseGPT, RIA).

A layer-wise method is a ``LayerwiseConfig`` subclass that names the input statistics it needs and
implements ``prune_weight`` by calling its pure math in ``ops.py``. Everything else (which modules,
which sparsity for each, validation before any weight changes, calibration data, the block walk,
the report) is here, once.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..calibration.data import CalibrationSet
from ..checks import check_choice, check_int, check_number, regex_list
from ..config import PrunerConfig
from ..engine.offload import describe_offload
from ..engine.report import RunMeter, model_record, module_entry
from ..engine.run import RunContext, changed_in_place, prepare
from ..engine.stats import LinearStats
from ..engine.targets import Target, linear_candidates, plan_targets, stored_matrix
from ..errors import UnsupportedModelError
from ..models import as_matrix, get_family
from ..patterns import Pattern, nm_channel_permutation, nm_kept_score, zero_masked_
from ..registry import MethodCost, register_method
from ..result import PruningResult
from ..structured import mlp_groups


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
    - ``expert_calibration``: how the experts of a mixture-of-experts model (fused 3-D ``gate_up_proj`` /
      ``down_proj``, each expert pruned as its own Linear) are calibrated: ``"routed"`` (default) on the tokens the
      router sends each expert, ``"all_tokens"`` on every token (every expert sees the whole calibration set, as
      if the router sent it everything). ``min_expert_tokens``: with ``"routed"``, an expert routed fewer
      calibration tokens than this is calibrated on all tokens instead; the report's entry of every expert
      projection gives ``expert_tokens`` (how many the router sent it) and ``calibrated_on``. Routers are never
      pruned.
    - ``channel_permutation``: with an N:M pattern, reorder the MLP hidden neurons of every block before its
      output Linear (``down_proj``/``fc2``) is pruned, so that each group of M input columns holds a balanced mix
      of important channels and N:M keeps more of the method's score (RIA's channel reallocation, Zhang et al.,
      2024). The producers' rows (``gate_proj``/``up_proj``/``fc1`` and their biases) are reordered the same way,
      so the model computes exactly the same function and saves as a stock model. Only these are permuted: q/k/v
      and the MLP inputs read the residual stream, whose channels cannot be reordered inside one block, and the
      attention output projection's inputs are left in order too; they are pruned as they are. The report's
      ``channel_permutation`` section lists the permuted modules.
    - ``accum_dtype``: ``"float32"`` (default) or ``"float64"``, the dtype the input statistics are summed in; the
      method reads them in float32 either way. In float64 every product of float32 inputs is exact and the sum
      does not depend on the order of the additions to ~1e-16, so a data-parallel run over several processes
      (``engine.distributed``) gets the statistics, and the masks, of one process: in float32 the per-process
      partial sums round differently and near-tied weights can swap, and the swap propagates to later blocks.
      Costs twice the statistics' memory and their accumulation time.
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    module_sparsity: dict[str, float] | None = None
    channel_permutation: bool = False
    accum_dtype: str = "float32"
    expert_calibration: str = field(default="routed", metadata={"omit_default": True})
    min_expert_tokens: int = field(default=16, metadata={"omit_default": True})

    statistics: ClassVar[frozenset] = frozenset()  # what the method reads: "sq_norm", "gram"
    # (in_features, out_features) -> (bytes, flops) of the per-Linear solve beyond the statistics, for the planner
    solve_cost: ClassVar[Callable[[int, int], tuple[int, float]] | None] = None

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
        if not isinstance(self.channel_permutation, bool):
            raise ValueError(f"{owner}.channel_permutation must be True or False, got {self.channel_permutation!r}.")
        if self.channel_permutation and not pattern.is_nm:
            raise ValueError(f"{owner}: channel_permutation=True reorders input channels so that an N:M pattern keeps "
                             f"more important weights; it needs pattern='N:M' (e.g. '2:4'), got pattern={self.pattern!r}.")
        if self.channel_permutation and type(self).channel_scores is LayerwiseConfig.channel_scores:
            raise ValueError(f"{owner} does not support channel_permutation: it defines no channel_scores.")
        check_number(owner, "sparsity", self.sparsity, 0.0, 1.0)
        self.sparsity = float(self.sparsity)
        check_choice(owner, "accum_dtype", self.accum_dtype, tuple(ACCUM_DTYPES))
        check_choice(owner, "expert_calibration", self.expert_calibration, ("routed", "all_tokens"))
        check_int(owner, "min_expert_tokens", self.min_expert_tokens, 0)
        self.target_modules = regex_list(owner, "target_modules", self.target_modules)
        self.exclude_modules = regex_list(owner, "exclude_modules", self.exclude_modules)
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
        a method implements it with a call into its ``ops.py``. The engine zeroes ``prune_mask`` in the model's
        weight in place, so a method that only chooses a mask returns ``weight`` itself (no copy): for a float32
        model it *is* the model's weight. ``stats`` may be shared with other Linears reading the same input; a
        method caches what it derives from them in ``stats.derived``."""

    def channel_scores(self, weight: torch.Tensor, stats: LinearStats | None) -> torch.Tensor:
        """Per-weight importance ``[out, in]`` (higher = keep, non-negative) that ``channel_permutation`` maximises
        the N:M-kept share of; a method that supports the option overrides this."""
        raise NotImplementedError(f"{type(self).__name__} does not support channel_permutation.")


def check_scope(owner: str, scope: str) -> None:
    check_choice(owner, "scope", scope, ("row", "matrix"))


# --------------------------------------------------------------------------------------------
# which modules, at which sparsity


# --------------------------------------------------------------------------------------------
# the block processor and the run


def permutable_inputs(model: nn.Module, stages: list, targets: list[Target]) -> dict[str, tuple[str, ...]]:
    """``{MLP output Linear: the Linears producing its inputs}`` for the targeted output Linears: the hidden
    neurons a permutation may reorder exactly. Raises when no targeted module has such inputs."""
    names = {t.name for t in targets}
    found = {g.output: g.inputs for g in mlp_groups(model, stages) if g.output in names}
    if not found:
        raise ValueError("channel_permutation reorders the hidden neurons of MLPs, but no pruned module is an MLP "
                         "output Linear (down_proj/fc2) of this model; drop channel_permutation or prune those "
                         "modules too.")
    return found


ACCUM_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def as_float32(stat: LinearStats | None) -> LinearStats | None:
    """Statistics summed in float64 (``accum_dtype="float64"``), rounded once to the float32 the methods read."""
    if stat is None or stat.dtype == torch.float32:
        return stat
    cast = {k: None if v is None else v.to(torch.float32) for k, v in
            (("sq_sum", stat.sq_sum), ("xtx", stat.xtx), ("x_sum", stat.x_sum))}
    return dataclasses.replace(stat, dtype=torch.float32, **cast)


class LayerwiseProcessor:
    def __init__(self, config: LayerwiseConfig, targets: list[Target],
                 permutable: dict[str, tuple[str, ...]] | None = None):
        self.config = config
        self.pattern = Pattern.parse(config.pattern)
        self.by_block: dict[str, list[Target]] = {}
        for t in targets:
            self.by_block.setdefault(t.block, []).append(t)
        self.permutable = permutable or {}  # MLP output Linear -> its producers (channel_permutation)
        self.expert_calibration = (config.expert_calibration, config.min_expert_tokens)  # read by the walker
        self.info: dict[str, dict] = {}
        self.zeros: dict[str, int] = {}  # each pruned weight's zeros, counted as it was zeroed

    def statistics(self, block_name: str, block: nn.Module) -> dict[str, tuple[nn.Module, frozenset]]:
        if not self.config.statistics:
            return {}
        return {t.name: (t.module, self.config.statistics) for t in self.by_block.get(block_name, [])}

    def process(self, block_name: str, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        targets = self.by_block.get(block_name, [])
        # Linears reading the same input share one statistics object (the engine's one statistic per distinct
        # input); it and what a method derives from it are released once its last reader is pruned
        readers: dict[int, int] = {}
        for t in targets:
            if stats.get(t.name) is not None:
                readers[id(stats[t.name])] = readers.get(id(stats[t.name]), 0) + 1
        rounded: dict[int, LinearStats] = {}  # float64 sums rounded once per shared object, so it stays shared
        for t in targets:
            weight = as_matrix(t.module)  # [out, in], a view of a Conv1D's [in, out] weight
            shared, extra = stats.get(t.name), {}
            stat = shared
            if shared is not None:
                if id(shared) not in rounded:
                    rounded[id(shared)] = as_float32(shared)
                stat = rounded[id(shared)]
            if t.name in self.permutable:
                stat, extra = self.permute_inputs(t, block_name, block, stat)
            new, prune, info = self.config.prune_weight(weight.detach().to(torch.float32), stat,
                                                        t.sparsity, self.pattern)
            with torch.no_grad():
                if new.data_ptr() != weight.data_ptr():  # a method that worked on a copy (or a half-precision model)
                    weight.copy_(new)
                # the one zeroing of the pruned weights, in place; its zero count is the report's (read while hot)
                self.zeros[t.name] = zero_masked_(weight, prune)
            del new
            self.info[t.name] = {**info, **extra, **(getattr(t.module, "report_info", None) or {})}
            if shared is not None:
                readers[id(shared)] -= 1
                if not readers[id(shared)]:
                    shared.release()
                    rounded.pop(id(shared)).release()

    def permute_inputs(self, t: Target, block_name: str, block: nn.Module,
                       stat: LinearStats | None) -> tuple[LinearStats | None, dict]:
        """Reorder the hidden neurons feeding ``t`` (its input columns, its producers' rows and biases) so that the
        coming N:M mask keeps more of the method's score; its statistics are reordered to match."""
        weight = as_matrix(t.module)
        scores = self.config.channel_scores(weight.detach().to(torch.float32), stat)
        perm = nm_channel_permutation(scores, self.pattern.n, self.pattern.m)
        before = nm_kept_score(scores, self.pattern.n, self.pattern.m)
        after = nm_kept_score(scores[:, perm], self.pattern.n, self.pattern.m)
        producers = self.permutable[t.name]
        moved = bool((perm != torch.arange(perm.numel(), device=perm.device)).any())
        if moved:
            with torch.no_grad():
                weight.copy_(weight.index_select(1, perm.to(weight.device)))
                for name in producers:
                    linear = block.get_submodule(name[len(block_name) + 1:])
                    for tensor in (as_matrix(linear), linear.bias):
                        if tensor is not None:
                            tensor.copy_(tensor.index_select(0, perm.to(tensor.device)))
            stat = None if stat is None else stat.permuted(perm)
        return stat, {"channel_permutation": {"permuted": moved, "producers": list(producers),
                                              "kept_score_gain": after / before - 1.0 if before > 0 else 0.0}}

    def state_dict(self) -> dict:  # what a checkpoint keeps: the per-module info the report shows
        return {"info": self.info}

    def load_state_dict(self, state: dict | None) -> None:
        self.info = dict((state or {}).get("info", {}))


def run_layerwise(pruner: Any, config: LayerwiseConfig, *, device: str | torch.device | None = None,
                  progress: bool = True, calibration: CalibrationSet | None = None,
                  checkpoint: Any = None) -> PruningResult:
    """Prune ``pruner.model`` in place with a layer-wise method and report what was done.

    ``calibration``: batches already built from ``config.calibration`` (an allocator that validated its
    data up front passes them); by default they are built here. ``checkpoint``: an
    ``hf_prune.checkpoint.RunCheckpoint`` to save after every block and to resume from."""
    model = pruner.model
    run = prepare(model, device, offload=True)
    targets = plan_targets(model, run.stages, config)
    run = run.for_targets(targets)
    permutable = permutable_inputs(model, run.stages, targets) if config.channel_permutation else None
    processor = LayerwiseProcessor(config, targets, permutable)
    with RunMeter() as meter:
        batches, provenance = None, {"source": None, "note": "data-free: the method reads no activations"}
        if config.statistics:
            with meter.phase("calibration_data"):
                if calibration is None:
                    calibration = run.calibration(config.calibration, tokenizer=pruner.tokenizer,
                                                  processor=pruner.processor)
            batches, provenance = calibration.batches, calibration.provenance
        resumed_from = None
        if checkpoint is not None:
            with meter.phase("checkpoint_fingerprints"):
                checkpoint.begin(model, config, batches, run.stages)  # refuses another model/config/data
            resumed_from = checkpoint.state.get("position")
        with meter.phase("walk_and_prune"), changed_in_place(lambda: len(processor.info),
                                                             "{n} of {total} modules were already pruned",
                                                             total=len(targets)):
            run.walk(batches, processor, progress=progress, desc=config.method, checkpoint=checkpoint,
                     stats_dtype=ACCUM_DTYPES[config.accum_dtype])
        missed = [t.name for t in targets if t.name not in processor.info]
        if missed:  # never a silent partial run
            raise UnsupportedModelError(
                f"{len(missed)} of the {len(targets)} selected modules were never reached by the block walk (e.g. "
                f"{missed[0]}), so they were not pruned; the model's blocks do not run as its family says.")
    sections = None
    if config.channel_permutation:
        sections = {"channel_permutation": {
            "modules": sorted(n for n, i in processor.info.items() if i.get("channel_permutation", {}).get("permuted")),
            "note": "MLP hidden neurons were reordered before each MLP output Linear was pruned (its input columns "
                    "with its producers' rows and biases: the same function); q/k/v and the MLP inputs read the "
                    "residual stream and keep their order, and so do the attention output projection's inputs."}}
    report = layerwise_report(run, targets, config, processor.info, provenance, meter, sections=sections,
                              zeros=processor.zeros)
    if checkpoint is not None:
        checkpoint.finish()
        report["run"]["checkpoint"] = {"folder": checkpoint.folder, "resumed_after": resumed_from}
    return PruningResult(config=config, report=report, model=model)


def layerwise_report(run: RunContext, targets: list[Target], config: PrunerConfig, info: dict[str, dict],
                     provenance: dict, meter: RunMeter, sections: dict | None = None,
                     zeros: dict[str, int] | None = None) -> dict:
    """The report of a layer-wise run: per targeted module its achieved sparsity and what ``info`` says of it
    (the method's per-module numbers); the model record says how the model was offloaded, if it was. ``zeros``:
    the zeros of the modules counted when they were pruned (a resumed run's earlier modules are counted here)."""
    pattern = Pattern.parse(getattr(config, "pattern", "unstructured"))
    entries = {}
    for t in targets:
        entry = module_entry(stored_matrix(t.module).detach(), t.sparsity, pattern, zeros=(zeros or {}).get(t.name))
        entry.update({k: v for k, v in info.get(t.name, {}).items()})
        entries[t.name] = entry
    record = model_record(run.model, run.family.name, run.stages)
    offload = describe_offload(run.model)
    if offload:
        record["offload"] = offload
    return run.report(config, pattern=str(pattern), entries=entries, block_of={t.name: t.block for t in targets},
                      calibration=provenance, meter=meter, record=record, sections=sections)


def layerwise_serves(model: nn.Module, config: Any = None) -> str | None:
    """Why a layer-wise method cannot prune ``model`` (None: it can): its blocks must hold a linear-like layer
    (``nn.Linear``, ``Conv1D``) or fused experts."""
    stages = get_family(model).stages(model)
    if linear_candidates(model, stages):
        return None
    return (f"{type(model).__name__}'s blocks ({', '.join(s.path for s in stages)}) hold no nn.Linear, Conv1D "
            "or fused experts layer to prune")


def layerwise_cost(config: LayerwiseConfig) -> MethodCost:
    """The planner's inputs for a layer-wise pruner: the statistics it reads and its per-Linear solve."""
    return MethodCost(statistics=frozenset(config.statistics), solve=config.solve_cost)


def register_layerwise(config_class: type, *, display_name: str, default: bool = False) -> None:
    """Register a layer-wise pruner: it runs through ``run_layerwise``, resumes, works on offloaded models and
    takes an allocation's ``module_sparsity``."""
    register_method(config_class, run_layerwise, display_name=display_name, resumable=True, offload=True,
                    layerwise=True, needs_data=lambda config: bool(config.statistics), cost=layerwise_cost,
                    default=default, serves=layerwise_serves)
