"""ModHiFi-P: remove MLP hidden neurons block by block through the calibration engine.

For each block (in order, the pruned outputs of earlier blocks feeding later ones): the engine records the
Gram of the MLP output Linear's inputs (the neurons) over real tokens; the processor scores the neurons,
picks the ones to keep (dead ones go first), rewrites the kept columns of the output Linear by the
closed-form least-squares compensation (``ops.least_squares_compensation``; with an intercept into the bias
when the layer has one), and slices the block with ``hf_prune.structured.shrink_mlp``.

Widths: ``per_layer_ratio`` keeps the same count in every block and writes it into the stock config;
``global_ratio`` first walks the dense model once to score every neuron on a layer-normalised scale,
fixes each block's count from one budget per stage, then prunes sequentially with those counts (the kept
neurons of a block are re-chosen on its pruned inputs); ``per_output_union`` keeps the union of the
per-output HiFi sets, so the count emerges per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...calibration.synthetic import sample_sequences
from ...engine.report import RunMeter
from ...engine.run import RunContext, changed_in_place, prepare
from ...engine.stats import LinearStats
from ...errors import CalibrationDataError, UnsupportedModelError
from ...models import get_family
from ...patterns import prune_count
from ...structured import MLPGroup, mlp_groups, set_mlp_width, shrink_mlp
from . import ops
from .config import ModHiFiConfig
from .result import ModHiFiResult, prune_report, size_summary

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class BlockPlan:
    group: MLPGroup
    original_width: int
    steps: list[dict] = field(default_factory=list)


class ModHiFiProcessor:
    """The engine's ``BlockProcessor`` for one pass: ``phase="score"`` only records per-neuron scores (the
    model is not changed); ``phase="prune"`` selects, compensates and slices."""

    def __init__(self, model: nn.Module, config: ModHiFiConfig, plans: dict[str, BlockPlan], *, phase: str,
                 keep_counts: dict[str, int] | None = None, iteration: int = 1):
        self.model, self.config, self.plans = model, config, plans
        self.phase, self.keep_counts, self.iteration = phase, keep_counts or {}, iteration
        self.scores: dict[str, torch.Tensor] = {}
        self.changed: list[str] = []

    def _output(self, plan: BlockPlan) -> nn.Linear:
        return self.model.get_submodule(plan.group.output)

    def _wants_mean(self, plan: BlockPlan) -> bool:
        return self.config.compensation == "least_squares" and self._output(plan).bias is not None

    def statistics(self, block_name: str, block: nn.Module) -> dict[str, tuple[nn.Module, frozenset]]:
        plan = self.plans.get(block_name)
        if plan is None or not self.config.needs_statistics:
            return {}
        kinds = {"gram"} | ({"sum"} if self._wants_mean(plan) else set())
        return {plan.group.output: (self._output(plan), frozenset(kinds))}

    def process(self, block_name: str, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        plan = self.plans.get(block_name)
        if plan is None:
            return
        cfg, group = self.config, plan.group
        out = self._output(plan)
        W = out.weight.detach()
        st = stats.get(group.output)
        G = st.gram.to(torch.float64) if st is not None else None
        mean = st.mean.to(torch.float64) if st is not None and self._wants_mean(plan) else None
        producers = [self.model.get_submodule(n).weight.detach() for n in group.inputs]
        if self.phase == "score":
            self.scores[block_name] = self._neuron_scores(W, G, producers, group)
            return
        width = group.width
        keep, order_info = self._select(block_name, W, G, producers, group)
        step: dict[str, Any] = {"iteration": self.iteration, "width_before": width, "width_after": int(keep.numel()),
                                "tokens": st.tokens if st is not None else 0, **order_info}
        new_cols, bias_delta = None, None
        if G is not None:
            energy = ops.layer_energy(W, G)
            step["dead_neurons"] = int(ops.dead_neurons(G).sum())
            step["reconstruction_error_uncompensated"] = _relative(ops.removed_energy(W, G, keep), energy)
            step["reconstruction_error"] = step["reconstruction_error_uncompensated"]
        if cfg.compensation == "least_squares" and keep.numel() < width:
            comp = ops.least_squares_compensation(W, G, keep, damp=cfg.damp, damp_mode=cfg.damp_mode,
                                                  max_damp=cfg.max_damp, mean=mean, what=group.output)
            new_cols, bias_delta = comp.weight, comp.bias_delta
            step["damp"] = comp.damp
            step["reconstruction_error"] = _relative(comp.residual, energy)
        if keep.numel() < width:
            with torch.no_grad():
                if new_cols is not None:
                    out.weight[:, keep.to(W.device)] = new_cols.to(device=W.device, dtype=W.dtype)
                if bias_delta is not None:
                    out.bias.add_(bias_delta.to(device=out.bias.device, dtype=out.bias.dtype))
            shrink_mlp(self.model, group, keep)
            self.changed.append(block_name)
        plan.steps.append(step)

    # ------------------------------------------------------------------------------------------
    def _neuron_scores(self, W, G, producers, group: MLPGroup) -> torch.Tensor:
        cfg = self.config
        if cfg.score == "greedy_fidelity":
            return ops.greedy_neuron_scores(W, G, damp=cfg.damp, damp_mode=cfg.damp_mode, max_damp=cfg.max_damp,
                                            what=group.output)
        scores = ops.neuron_scores(cfg.score, W, G, producers)
        if G is not None:
            scores = scores.masked_fill(ops.dead_neurons(G), -float("inf"))
        return scores

    def _select(self, block_name: str, W, G, producers, group: MLPGroup) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        width = group.width
        dead = ops.dead_neurons(G) if G is not None else None
        if cfg.selection == "per_output_union":
            k = width - prune_count(width, cfg.sparsity)
            return ops.union_keep(ops.per_output_scores(cfg.score, W, G), max(1, k), dead), {"hifi_set_size": k}
        count = self.keep_counts[block_name]
        if count >= width:
            return torch.arange(width), {}
        if cfg.score == "greedy_fidelity":
            order, cost, damp_used = ops.greedy_fidelity(W, G, width - count, damp=cfg.damp, damp_mode=cfg.damp_mode,
                                                         max_damp=cfg.max_damp, what=group.output)
            kept = torch.ones(width, dtype=torch.bool)
            kept[order] = False
            return torch.nonzero(kept).flatten(), {"greedy_damp": damp_used}
        return ops.keep_top(ops.neuron_scores(cfg.score, W, G, producers), count, dead), {}


def _relative(error: float, energy: float) -> float:
    return error / energy if energy > 0 else 0.0


# ----------------------------------------------------------------------------------------------


def calibration_batches(pruner: Any, config: ModHiFiConfig, run: RunContext) -> tuple[list, dict]:
    """The calibration set, or, with no data given, sequences sampled from the causal LM itself."""
    model = pruner.model
    if config.calibration.dataset is not None:
        cal = run.calibration(config.calibration, tokenizer=pruner.tokenizer, processor=pruner.processor)
        return cal.batches, cal.provenance
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not run.family.causal_lm or head is None:
        raise CalibrationDataError(
            f"ModHiFi reads activations but no calibration data was given, and the data-free path (sequences "
            f"sampled from the model itself) needs a causal language model with an LM head; "
            f"{type(model).__name__} is not one. Pass real or synthetic inputs as calibration_dataset (for vision "
            "models the paper uses diffusion-generated images), or use score='l2_norm' with compensation='none', "
            "which reads no data.")
    cal = config.calibration
    generated = sample_sequences(model, num_samples=cal.num_samples, seq_len=cal.seq_len, batch_size=cal.batch_size,
                                 seed=cal.seed, temperature=config.generation_temperature, tokenizer=pruner.tokenizer)
    return generated.batches, generated.provenance


def _validate(config: ModHiFiConfig, groups: list[MLPGroup]) -> None:
    """Every MLP keeps at least one neuron (finite weights were checked by ``prepare``)."""
    for group in groups:
        if config.selection != "per_output_union" and group.width - prune_count(group.width, config.sparsity) < 1:
            raise ValueError(f"ModHiFiConfig.sparsity={config.sparsity} would remove all {group.width} neurons of "
                             f"{group.block}'s MLP; lower it so that at least one neuron stays.")


def _stage_keep_counts(plans: dict[str, BlockPlan], scores: dict[str, torch.Tensor], config: ModHiFiConfig,
                       fraction: float) -> dict[str, int]:
    """global_ratio: per stage, remove the lowest layer-normalised scores until the stage has lost
    ``fraction`` of its original neurons."""
    counts: dict[str, int] = {}
    by_stage: dict[str, list[str]] = {}
    for block, plan in plans.items():
        by_stage.setdefault(plan.group.stage.name, []).append(block)
    for blocks in by_stage.values():
        original = sum(plans[b].original_width for b in blocks)
        current = sum(plans[b].group.width for b in blocks)
        remove = max(0, prune_count(original, fraction) - (original - current))
        kept = ops.global_keep_counts([scores[b] for b in blocks], remove)
        counts.update(dict(zip(blocks, kept)))
    return counts


def serves(model: nn.Module, config: ModHiFiConfig | None = None) -> str | None:
    """Why ModHiFi cannot prune ``model`` (None: it can): pruning needs MLP blocks of a known neuron layout
    (a stage's ``MLPSpec``); unlearning works on any model whose blocks are found."""
    if config is not None and config.mode == "unlearn":
        return None
    if any(s.mlp is not None for s in get_family(model).stages(model)):
        return None
    return (f"{type(model).__name__} has no transformer MLP blocks that ModHiFi can prune (it prunes MLP hidden "
            "neurons); mode='unlearn' works on it.")


def run_prune(pruner: Any, config: ModHiFiConfig, *, device: str | torch.device | None = None,
              progress: bool = True) -> ModHiFiResult:
    model = pruner.model
    run = prepare(model, device)
    run = run.with_stages([s for s in run.stages if s.mlp is not None])
    if not run.stages:
        raise UnsupportedModelError(serves(model, config))
    groups = mlp_groups(model, run.stages)
    _validate(config, groups)
    plans = {g.block: BlockPlan(g, g.width) for g in groups}
    before = size_summary(model, groups)
    stats_dtype = _DTYPES[config.accum_dtype]
    changed: list[str] = []
    with RunMeter() as meter:
        batches, provenance = None, {"source": None, "note": "data-free: score='l2_norm' without compensation "
                                                             "reads no activations"}
        if config.needs_statistics:
            with meter.phase("calibration_data"):
                batches, provenance = calibration_batches(pruner, config, run)
        with changed_in_place(lambda: len(changed), "the MLPs of {n} blocks were already pruned"):
            for iteration in range(1, config.num_iterations + 1):
                fraction = config.sparsity * iteration / config.num_iterations
                counts = None
                if config.selection == "per_layer_ratio":
                    counts = {b: p.original_width - prune_count(p.original_width, fraction) for b, p in plans.items()}
                elif config.selection == "global_ratio":
                    scorer = ModHiFiProcessor(model, config, plans, phase="score", iteration=iteration)
                    with meter.phase("scoring_pass"):
                        run.walk(batches, scorer, progress=progress, desc="modhifi scores", stats_dtype=stats_dtype)
                    counts = _stage_keep_counts(plans, scorer.scores, config, fraction)
                processor = ModHiFiProcessor(model, config, plans, phase="prune", keep_counts=counts,
                                             iteration=iteration)
                with meter.phase("walk_and_prune"):
                    try:
                        run.walk(batches, processor, progress=progress, desc="modhifi", stats_dtype=stats_dtype)
                    finally:
                        changed.extend(b for b in processor.changed if b not in changed)
        config_widths = {}
        for stage in run.stages:
            widths = {p.group.width for p in plans.values() if p.group.stage is stage}
            config_widths[stage.name] = set_mlp_width(model, stage) if len(widths) == 1 else None
    report = prune_report(run, config, plans, provenance, meter, before, size_summary(model, groups), config_widths)
    return ModHiFiResult(config=config, report=report, model=model)
