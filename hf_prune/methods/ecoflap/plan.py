"""What ``hf-prune plan`` needs to know about ECoFLaP: its stage-2 pruner's cost plus the scoring stage."""

from __future__ import annotations

from functools import partial

from torch import nn

from ...engine.targets import linear_candidates
from ...planner import StagePlan
from ...registry import MethodCost, get_method
from .config import ECoFLaPConfig


def ecoflap_cost(config: ECoFLaPConfig) -> MethodCost:
    stage2 = get_method(config.layer_pruner)
    inner = stage2.cost(config.layer_pruner_config()) if stage2.cost is not None else MethodCost()
    return MethodCost(statistics=inner.statistics, solve=inner.solve, extra_stage=partial(scores_stage, config))


def scores_stage(allocator: ECoFLaPConfig, model: nn.Module, stages: list, planned: list[StagePlan], width: int,
                 batch_size: int, seq_len: int) -> StagePlan:
    """ECoFLaP's stage 1 (with the config's defaults): whole-model passes with every weight on the device.

    Zeroth order: 2 forward passes per perturbation unit (a Linear, or a group) per batch, plus a snapshot
    and a float32 direction of the largest unit; a perturbed pass replays the blocks before the perturbed one, so
    it costs the head plus on average (L + 1) / 2L of the L blocks' work, and one unperturbed pass per batch
    records them. First order: 2 forwards and a backward (about 2 forwards)
    per batch, with every block's input kept and one block's activations and gradients recomputed.
    """
    linears = linear_candidates(model, stages)
    batches = -(-allocator.num_score_samples // batch_size)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_params = head.weight.numel() if head is not None else 0
    vocab = head.weight.shape[0] if head is not None else 0
    block_flops = 2 * batch_size * sum(s.block_params * s.blocks * s.tokens_per_sample for s in planned)
    head_flops = 2 * batch_size * head_params * seq_len
    forward_flops = block_flops + head_flops
    working = max(s.forward_bytes for s in planned) + batch_size * seq_len * vocab * 4  # + float32 logits
    block_count = sum(s.blocks for s in planned)
    if allocator.score == "zeroth_order":
        if allocator.zo_perturb == "tensor":
            units, largest = len(linears), max(m.weight.numel() for _, m, *_ in linears)
        else:
            units = {"layer": len(linears), "block": block_count, "submodel": len(stages)}[allocator.granularity]
            largest = max(s.block_params for s in planned)  # a block's weights (a bound for one group)
        extra = largest * (width + 4)
        perturbed = head_flops + block_flops * (block_count + 1) / (2 * block_count)  # replayed prefix
        flops = batches * (units * allocator.zo_num_noise * 2 * perturbed + forward_flops)
    else:
        extra = sum(s.blocks * batch_size * s.tokens_per_sample * s.hidden * width for s in planned) \
            + 2 * max(s.forward_bytes + s.block_params * width for s in planned)
        flops = batches * 4 * forward_flops
    weights = sum(p.numel() for p in model.parameters()) * width
    return StagePlan(f"{allocator.method} scores ({allocator.score})", block_count,
                     max(s.block_params for s in planned), max(s.hidden for s in planned), seq_len, 0, extra,
                     working, weights + working + extra, 0, flops)
