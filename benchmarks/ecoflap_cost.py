"""ECoFLaP's zeroth-order allocation: its cost against its stability, on the shared trained decoder.

    OMP_NUM_THREADS=1 python benchmarks/ecoflap_cost.py              # ../shared/models/pylm, 60%, 64 x 256 tokens

One process, one thread: uniform Wanda first (the cost reference, after one unmeasured warm-up run), then
ECoFLaP + Wanda with each zeroth-order setting (perturbation unit / most scoring samples [/ early-stopping
tolerance / round size]), each from a fresh copy of the dense model. For each: the whole run's time over uniform Wanda's, stage 1's time, the
samples scored (and, early-stopped, the rounds and why it stopped), the forward passes, the per-block sparsities it
allocated, Spearman's rank correlation of its per-module sparsities with the first (most expensive) setting's, the
largest per-block difference from it, and perplexity on ``pylm-data/heldout.txt``. Prints; never asserts. With
``--paired`` each setting's ``x Wanda`` divides by a uniform Wanda run timed just before it (a shared machine's load
then hits both).

    OMP_NUM_THREADS=1 python benchmarks/ecoflap_cost.py --settings tensor/32 default design/16/0.005/2
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pylm_paths import PYLM, PYLM_DATA  # noqa: E402  (this folder is on sys.path when a script here runs)

from hf_prune import CalibrationConfig, ECoFLaPConfig, Pruner, WandaConfig  # noqa: E402
from hf_prune.engine.report import format_table  # noqa: E402
from hf_prune.evaluation import perplexity  # noqa: E402

SETTINGS = {  # name -> ECoFLaPConfig overrides (no early stopping unless the name says so)
    "tensor/32": dict(zo_perturb="tensor", num_score_samples=32, zo_stop_tol=None),
    "tensor/16": dict(zo_perturb="tensor", num_score_samples=16, zo_stop_tol=None),
    "tensor/8": dict(zo_perturb="tensor", num_score_samples=8, zo_stop_tol=None),
    "tensor/4": dict(zo_perturb="tensor", num_score_samples=4, zo_stop_tol=None),
    "design/32": dict(zo_perturb="design", num_score_samples=32, zo_stop_tol=None),
    "design/16": dict(zo_perturb="design", num_score_samples=16, zo_stop_tol=None),
    "design/8": dict(zo_perturb="design", num_score_samples=8, zo_stop_tol=None),
    "block/16": dict(zo_perturb="block", num_score_samples=16, zo_stop_tol=None),
    "block/8": dict(zo_perturb="block", num_score_samples=8, zo_stop_tol=None),
    "default": dict(),  # ECoFLaPConfig's defaults: design, early stopping
}


def setting(name: str) -> dict:
    """A named setting, or ``PERTURB/MAX/TOL/ROUND`` (e.g. ``design/16/0.01/2``): early stopping with that tolerance
    and round size, at most MAX samples."""
    if name in SETTINGS:
        return SETTINGS[name]
    try:
        perturb, most, tol, round_samples = name.split("/")
        return dict(zo_perturb=perturb, num_score_samples=int(most), zo_stop_tol=float(tol),
                    zo_round_samples=int(round_samples))
    except ValueError:
        raise SystemExit(f"unknown setting {name!r}: one of {', '.join(SETTINGS)} or PERTURB/MAX/TOL/ROUND") from None


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):  # average ranks over ties
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return torch.tensor(r, dtype=torch.float64)

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=PYLM)
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--paired", action="store_true",
                        help="time a uniform Wanda run right before each setting and divide by that one")
    parser.add_argument("--settings", nargs="+", default=["tensor/32", "tensor/8", "design/32", "design/8", "block/16",
                                                          "default"],
                        help=f"named settings ({', '.join(SETTINGS)}) or PERTURB/MAX/TOL/ROUND")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = Pruner.from_pretrained(args.model, dtype=torch.float32)
    cal = CalibrationConfig(dataset=f"{PYLM_DATA}/calibration.txt", num_samples=args.num_samples,
                            seq_len=args.seq_len, seed=0)
    heldout = f"{PYLM_DATA}/heldout.txt"

    def ppl(model):
        return perplexity(model, base.tokenizer, heldout, seq_len=args.seq_len, max_windows=args.eval_windows)

    rows = [["dense", "-", "-", "-", "-", "-", "-", "-", "-", f"{ppl(base.model):.3f}"]]
    # a first Wanda run warms what every later run reuses (the calibration text read and tokenized), unmeasured
    Pruner(copy.deepcopy(base.model), base.tokenizer).prune(WandaConfig(sparsity=args.sparsity, calibration=cal),
                                                            progress=False)
    def wanda_run():
        pruner = Pruner(copy.deepcopy(base.model), base.tokenizer)
        start = time.perf_counter()
        pruner.prune(WandaConfig(sparsity=args.sparsity, calibration=cal), progress=False)
        return time.perf_counter() - start, pruner

    wanda, pruner = wanda_run()
    rows.append(["uniform Wanda", f"{wanda:.1f}", "1.00", "-", "-", "-", "-", "-", "-", f"{ppl(pruner.model):.3f}"])
    first = first_blocks = None
    for name in args.settings:
        if args.paired:  # the reference measured just before, so that a change of load hits both
            wanda = wanda_run()[0]
        pruner = Pruner(copy.deepcopy(base.model), base.tokenizer)
        config = ECoFLaPConfig(sparsity=args.sparsity, calibration=cal, **setting(name))
        start = time.perf_counter()
        result = pruner.prune(config, progress=False)
        seconds = time.perf_counter() - start
        allocation = result.allocation
        names = sorted(allocation.module_sparsity)
        values = [allocation.module_sparsity[n] for n in names]
        blocks = [g["sparsity"] for g in allocation.groups.values()]
        if first is None:
            first, first_blocks = values, blocks
        rho = spearman(values, first)
        worst = max(abs(a - b) for a, b in zip(blocks, first_blocks))
        provenance = allocation.provenance
        stopping = provenance.get("early_stopping")
        samples = (f"{stopping['samples_used']} of {stopping['max_samples']} ({len(stopping['rounds'])} rounds, "
                   f"{stopping['stopped']})" if stopping else str(config.num_score_samples))
        scores = provenance["run"]["phases_s"]["scores"]
        stop = "" if config.zo_stop_tol is None else f"/{config.zo_stop_tol:g}/{config.zo_round_samples}"
        label = name if name != "default" else f"default ({config.zo_perturb}/{config.num_score_samples}{stop})"
        rows.append([f"ECoFLaP ZO {label} + Wanda", f"{seconds:.1f}", f"{seconds / wanda:.2f}", f"{scores:.1f}",
                     samples, str(provenance["passes"]["forward"]), " ".join(f"{b:.3f}" for b in blocks),
                     f"{rho:.3f}", f"{worst:.3f}", f"{ppl(pruner.model):.3f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"{args.model}, {args.sparsity:g} sparsity, {args.num_samples} x {args.seq_len} calibration tokens "
          f"(calibration.txt), perplexity over {args.eval_windows} windows of heldout.txt, 1 thread")
    print(format_table(rows, ["run", "time s", "x Wanda", "scores s", "score samples", "forwards",
                              "per-block sparsity", "rho vs first", "max block |d| vs first", "perplexity"]))

if __name__ == "__main__":
    main()
