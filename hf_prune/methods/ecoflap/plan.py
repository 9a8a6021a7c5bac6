"""What ``hf-prune plan`` needs to know about ECoFLaP: its stage-2 pruner's cost plus the scoring stage."""

from __future__ import annotations

from functools import partial

from torch import nn

from ...engine.targets import linear_candidates
from ...planner import StagePlan
from ...registry import MethodCost, get_method
from .config import ECoFLaPConfig
from .scores import sign_design


def ecoflap_cost(config: ECoFLaPConfig) -> MethodCost:
    stage2 = get_method(config.layer_pruner)
    inner = stage2.cost(config.layer_pruner_config()) if stage2.cost is not None else MethodCost()
    return MethodCost(statistics=inner.statistics, solve=inner.solve, extra_stage=partial(scores_stage, config))


def scores_stage(allocator: ECoFLaPConfig, model: nn.Module, stages: list, planned: list[StagePlan], width: int,
                 batch_size: int, seq_len: int) -> StagePlan:
    """ECoFLaP's stage 1 (with the config's defaults): whole-model passes with every weight on the device.

    Zeroth order: 2 forward passes per perturbation unit (a Linear, or a group) per batch, or with
    ``zo_perturb="design"`` n per block (the smallest power of two above its Linears), plus a snapshot and a float32
    direction of the largest unit (design: of a block); with early stopping, for the most samples it may score; a
    perturbed pass replays the blocks before the perturbed one, so
    it costs the head plus on average (L + 1) / 2L of the L blocks' work, and one unperturbed pass per batch
    records them. First order: 2 forwards and a backward (about 2 forwards)
    per batch, with every block's input kept and one block's activations and gradients recomputed.
    """
    linears = linear_candidates(model, stages)
    stopping = allocator.score == "zeroth_order" and allocator.zo_stop_tol is not None
    if stopping:  # early stopping scores rounds of whole batches; the estimate is for the most samples it may use
        batch_size = min(batch_size, allocator.zo_round_samples)
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
            pairs, largest = 2 * len(linears), max(m.weight.numel() for _, m, *_ in linears)
            extra = largest * (width + 4)
        elif allocator.zo_perturb == "design":  # n passes per block for its m < n Linears, all perturbed at once
            pairs = block_count * len(sign_design(-(-len(linears) // max(block_count, 1))))
            extra = max(s.block_params for s in planned) * (width + 8)  # snapshots and float32 directions
        else:
            units = {"layer": len(linears), "block": block_count, "submodel": len(stages)}[allocator.granularity]
            pairs = 2 * units
            extra = max(s.block_params for s in planned) * (width + 4)  # a block's weights (a bound for one group)
        perturbed = head_flops + block_flops * (block_count + 1) / (2 * block_count)  # replayed prefix
        flops = batches * (pairs * allocator.zo_num_noise * perturbed + forward_flops)
    else:
        extra = sum(s.blocks * batch_size * s.tokens_per_sample * s.hidden * width for s in planned) \
            + 2 * max(s.forward_bytes + s.block_params * width for s in planned)
        flops = batches * 4 * forward_flops
    weights = sum(p.numel() for p in model.parameters()) * width
    return StagePlan(f"{allocator.method} scores ({allocator.score})", block_count,
                     max(s.block_params for s in planned), max(s.hidden for s in planned), seq_len, 0, extra,
                     working, weights + working + extra, 0, flops)
