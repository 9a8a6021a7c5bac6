"""Why does SPP's training-free path (ours) lose to RIA on trained weights? One table per hypothesis.

    python benchmarks/spp_diagnosis.py                     # the shared trained decoder ../shared/models/pylm
    python benchmarks/spp_diagnosis.py --num-samples 16 --eval-windows 16 --sparsities 0.5

Every row prunes every Linear of the blocks to the same sparsity, per matrix, with one ranking rule and one way of
collecting the input statistics, then measures held-out perplexity:

- ranking: ``ria`` (RIA's score, alpha 0.5), ``iss`` (``ops.iss_weight_path``: RIA-driven pressure slowed or sped up
  by the reconstruction-error ratio c = 1 + 2 [R G]_ij / (W_ij G_jj)), ``iss xB`` (the correction term scaled by B;
  B = -1 flips its sign), ``iss-greedy`` (no integration: remove the weight of least RIA score x c, re-rating after
  every ``step_fraction`` batch);
- statistics: ``dense`` (every block sees the dense model's activations: one pass gives every sparsity, as the
  path does) or ``pruned`` (each block sees the outputs of the blocks before it pruned at the row's sparsity, as
  RIA does; one pass per sparsity).

Also printed: each ranking's layer reconstruction error ||(W - W_s) X||^2 summed over layers, relative to RIA's.
Prints tables; never asserts.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pylm_paths import PYLM, PYLM_DATA  # noqa: E402  (this folder is on sys.path when a script here runs)

from hf_prune import CalibrationConfig, Pruner, SPPConfig  # noqa: E402
from hf_prune.engine.report import format_table  # noqa: E402
from hf_prune.engine.run import prepare  # noqa: E402
from hf_prune.evaluation import perplexity  # noqa: E402
from hf_prune.methods.ria.ops import ria_scores  # noqa: E402
from hf_prune.methods.spp import ops  # noqa: E402
from hf_prune.methods.spp.training_free import plan_path_targets  # noqa: E402
from hf_prune.patterns import prune_count  # noqa: E402


def iss_scaled(w: torch.Tensor, g: torch.Tensor, beta: float, step_fraction: float, greedy: bool) -> torch.Tensor:
    """``ops.iss_weight_path`` with the correction term scaled by ``beta`` (beta=1: the shipped path) or, with
    ``greedy``, the instantaneous rate instead of the integrated pressure. Returns the rank (0 = kept longest)."""
    w = w.detach().float()
    g = g.float()
    diag = g.diagonal().clamp_min(0.0)
    scores = ria_scores(w, diag, 0.5)
    own = w * diag.unsqueeze(0)
    safe_own = torch.where(own != 0, own, torch.ones_like(own))
    tiny = torch.finfo(torch.float32).tiny
    numel = w.numel()
    removed = torch.zeros_like(w, dtype=torch.bool)
    z = torch.zeros_like(w)
    leave = torch.full(w.shape, math.inf, dtype=torch.float64)
    batch = max(1, math.ceil(step_fraction * numel))
    t, left = 0.0, 0
    while left < numel:
        gone = torch.where(removed, w, torch.zeros_like(w))
        ratio = torch.where(own != 0, 1.0 + beta * 2.0 * (gone @ g) / safe_own, torch.ones_like(own)).clamp_min(1e-3)
        rate = 1.0 / (scores * ratio).clamp_min(tiny)
        k = min(batch, numel - left)
        if greedy:
            key = torch.where(removed, torch.full_like(z, -math.inf), rate)
            idx = torch.topk(key.flatten(), k).indices
            out = torch.zeros(numel, dtype=torch.bool)
            out[idx] = True
            out = out.view_as(w)
            leave[out] = float(left)
        else:
            need = torch.where(removed, torch.full_like(z, math.inf), (1.0 - z) / rate)
            dt = float(need.flatten().kthvalue(k).values)
            out = ~removed & (need <= dt)
            leave[out] = t + need[out].double()
            z = torch.where(removed, z, z + dt * rate)
            t += dt
        removed |= out
        left += int(out.sum())
    order = torch.argsort(-scores.flatten().double(), stable=True)
    order = order[torch.argsort(-leave.flatten()[order], stable=True)]
    rank = torch.empty(numel, dtype=torch.int64)
    rank[order] = torch.arange(numel)
    return rank.view_as(w)


def ranking(rule: str, w: torch.Tensor, g: torch.Tensor, step_fraction: float) -> torch.Tensor:
    if rule == "ria":
        s = ria_scores(w.float(), g.diagonal().clamp_min(0.0), 0.5).flatten()
        order = torch.argsort(-s.double(), stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        return rank.view_as(w)
    if rule == "wanda":
        s = (w.float().abs() * g.diagonal().clamp_min(0.0).sqrt().unsqueeze(0)).flatten()
        order = torch.argsort(-s.double(), stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        return rank.view_as(w)
    if rule == "iss":
        return ops.iss_weight_path(w, g, step_fraction=step_fraction)[0].long()
    if rule == "iss-greedy":
        return iss_scaled(w, g, 1.0, step_fraction, greedy=True)
    if rule.startswith("iss x"):
        return iss_scaled(w, g, float(rule[5:]), step_fraction, greedy=False)
    raise ValueError(rule)


def keep_mask(rank: torch.Tensor, sparsity: float) -> torch.Tensor:
    return rank < rank.numel() - prune_count(rank.numel(), sparsity)


class Processor:
    """Ranks every targeted Linear of a block from its input Gram; with ``sparsity`` set, prunes the block at it
    before the walker feeds the next block (``pruned`` statistics)."""

    def __init__(self, targets, rule: str, sparsity: float | None, step_fraction: float):
        self.by_block = {}
        for t in targets:
            self.by_block.setdefault(t.block, []).append(t)
        self.rule, self.sparsity, self.step_fraction = rule, sparsity, step_fraction
        self.ranks, self.grams = {}, {}

    def statistics(self, block_name, block):
        return {t.name: (t.module, frozenset({"gram"})) for t in self.by_block.get(block_name, [])}

    def process(self, block_name, block, stats):
        for t in self.by_block.get(block_name, []):
            g = stats[t.name].gram
            self.grams[t.name] = g
            self.ranks[t.name] = ranking(self.rule, t.module.weight, g, self.step_fraction)
            if self.sparsity is not None:
                with torch.no_grad():
                    t.module.weight.mul_(keep_mask(self.ranks[t.name], self.sparsity))


def recon_error(dense, ranks, grams, sparsity):
    """sum over layers of tr(D G D^T) with D the removed weights (the layers' output error on calibration data)."""
    total = 0.0
    for name, rank in ranks.items():
        w = dense.get_submodule(name).weight.detach().float()
        d = torch.where(keep_mask(rank, sparsity), torch.zeros_like(w), w)
        total += float(((d @ grams[name]) * d).sum())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=PYLM)
    parser.add_argument("--calibration", default=f"{PYLM_DATA}/calibration.txt")
    parser.add_argument("--eval", default=f"{PYLM_DATA}/heldout.txt")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--rules", nargs="+", default=["ria", "iss", "iss x0.5", "iss x-1", "iss-greedy"])
    parser.add_argument("--stats", nargs="+", default=["dense", "pruned"], choices=["dense", "pruned"])
    parser.add_argument("--step-fraction", type=float, default=0.01)
    args = parser.parse_args()

    base = Pruner.from_pretrained(args.model)
    dense, tok = base.model.eval(), base.tokenizer
    ev = dict(seq_len=args.seq_len, max_windows=args.eval_windows)
    cal = CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, seed=0)
    print(f"{args.model}: dense perplexity {perplexity(dense, tok, args.eval, **ev):.3f} ({args.eval_windows} "
          f"windows of {args.seq_len} of {args.eval}); {args.num_samples} x {args.seq_len} calibration tokens of "
          f"{args.calibration}\n")
    run = prepare(dense, None)
    calibration = run.calibration(cal, args.calibration, tokenizer=tok, processor=None)
    rows, ria_err = [], {}
    for stats in args.stats:
        for rule in args.rules:
            passes = [None] if stats == "dense" else args.sparsities
            for pass_sparsity in passes:
                model = copy.deepcopy(dense)
                mrun = prepare(model, None)
                targets = plan_path_targets(model, mrun.stages, SPPConfig())
                proc = Processor(targets, rule, pass_sparsity, args.step_fraction)
                start = time.perf_counter()
                mrun.for_targets(targets).walk(calibration.batches, proc, progress=False, desc="diag")
                seconds = time.perf_counter() - start
                for s in (args.sparsities if pass_sparsity is None else [pass_sparsity]):
                    pruned = copy.deepcopy(dense)
                    with torch.no_grad():
                        for name, rank in proc.ranks.items():
                            pruned.get_submodule(name).weight.mul_(keep_mask(rank, s))
                    err = recon_error(dense, proc.ranks, proc.grams, s)
                    if rule == "ria":
                        ria_err[(stats, s)] = err
                    rel = err / ria_err[(stats, s)] if (stats, s) in ria_err else float("nan")
                    rows.append([stats, rule, f"{s:.1f}", f"{perplexity(pruned, tok, args.eval, **ev):.3f}",
                                 f"{rel:.3f}", f"{seconds:.1f}"])
                    print(" | ".join(rows[-1]), flush=True)
    print()
    print(format_table(rows, ["statistics", "ranking", "sparsity", "perplexity", "layer error / RIA's", "pass s"]))


if __name__ == "__main__":
    main()
