"""One-shot pruners side by side: wall time, peak memory and perplexity next to the dense model.

    python benchmarks/oneshot.py                              # the shared trained decoder (../shared/models/pylm)
    python benchmarks/oneshot.py --methods ria wanda sparsegpt --patterns 2:4 --channel-permutation
    python benchmarks/oneshot.py --model toy                  # hf_prune.toy's small LLaMA on builtin:python-docs
    python benchmarks/oneshot.py --model path/or/hub-id --calibration c4-file.jsonl --eval wikitext.txt

Also printed, for the targets of the core issue:
- "x fwd": each method's prune time over one dense forward pass of the calibration batches
  (Wanda's should be close to the two block passes the walker makes: statistics, then pruned outputs);
- "solve %": the share of SparseGPT's time spent inside its per-layer solves;
- "+RSS": peak RSS during the prune above the RSS with the model loaded, next to an estimate of one
  block's weights plus the cached activations.
``--channel-permutation`` runs every N:M pattern twice, as is and with ``channel_permutation=True`` ("+perm").
Prints tables; never asserts.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from peers.measure import rss_now  # noqa: E402
from pylm_paths import PYLM, PYLM_DATA  # noqa: E402  (this folder is on sys.path when a script here runs)

from hf_prune import CalibrationConfig, MagnitudeConfig, Pruner, RIAConfig, SparseGPTConfig, WandaConfig  # noqa: E402
from hf_prune.calibration import build_calibration  # noqa: E402
from hf_prune.engine.report import format_table  # noqa: E402
from hf_prune.evaluation import perplexity  # noqa: E402
from hf_prune.methods.sparsegpt import config as sparsegpt_config  # noqa: E402
from hf_prune.models import get_family  # noqa: E402

METHODS = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig, "ria": RIAConfig}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=PYLM, help=f"Hub id or folder (default: the shared trained decoder {PYLM}); "
                                                       "'toy': hf_prune.toy's LLaMA on builtin:python-docs")
    parser.add_argument("--toy-size", default="small", choices=["tiny", "small"])
    parser.add_argument("--calibration", default=None, help=f"calibration text (default: {PYLM_DATA}/calibration.txt, "
                                                            "or builtin:python-docs for the toy)")
    parser.add_argument("--eval", default=None, help=f"held-out text (default: {PYLM_DATA}/heldout.txt, or "
                                                     "builtin:python-docs, whose test split is used, for the toy)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--channel-permutation", action="store_true",
                        help="also run every N:M pattern with channel_permutation=True")
    args = parser.parse_args()
    toy = args.model == "toy"
    args.calibration = args.calibration or ("builtin:python-docs" if toy else f"{PYLM_DATA}/calibration.txt")
    args.eval = args.eval or ("builtin:python-docs" if toy else f"{PYLM_DATA}/heldout.txt")

    if not toy:
        base = Pruner.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        dense, tokenizer = base.model, base.tokenizer
    else:
        from hf_prune.toy import toy_causal_lm

        dense, tokenizer = toy_causal_lm(args.toy_size)
    dense.eval()
    name = args.model if not toy else f"toy LLaMA ({args.toy_size}, trained on builtin:python-docs)"
    params = sum(p.numel() for p in dense.parameters())
    cal = CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, dataset=args.calibration)
    family = get_family(dense)
    batches = build_calibration(cal, tokenizer=tokenizer, causal_lm=family.causal_lm).batches

    with torch.no_grad():  # one dense forward over the calibration batches: the unit of "x fwd"
        start = time.perf_counter()
        for b in batches:
            dense(**b)
        forward_s = time.perf_counter() - start
    dense_ppl = perplexity(dense, tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.eval_windows,
                           batch_size=8)
    stage = family.stages(dense)[0]
    block = stage.blocks(dense)[0]
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    hidden = dense.config.hidden_size
    act_bytes = 2 * args.num_samples * args.seq_len * hidden * next(dense.parameters()).element_size()
    print(f"model: {name}, {params / 1e6:.2f}M parameters, {len(stage.blocks(dense))} blocks")
    print(f"calibration: {args.calibration}, {args.num_samples} x {args.seq_len} tokens; evaluation: {args.eval} "
          f"(up to {args.eval_windows} windows of {args.seq_len}); one dense calibration forward: {forward_s:.2f}s")
    print(f"one block ({block_bytes / 2**20:.1f} MiB) + cached activations in and out ({act_bytes / 2**20:.1f} MiB) "
          f"= {(block_bytes + act_bytes) / 2**20:.1f} MiB\n")

    solve_time = [0.0]
    original = sparsegpt_config.sparsegpt_prune

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            solve_time[0] += time.perf_counter() - t

    sparsegpt_config.sparsegpt_prune = timed
    rows = [["dense", "-", "0.0000", f"{dense_ppl:.3f}", "-", "-", "-", "-", "-"]]
    runs = [(p, False) for p in args.patterns]
    if args.channel_permutation:
        runs = [r for p in args.patterns for r in ([(p, False), (p, True)] if ":" in p else [(p, False)])]
    for method in args.methods:
        for pattern, permute in runs:
            model = copy.deepcopy(dense)
            config = METHODS[method](sparsity=args.sparsity if pattern == "unstructured" else None, pattern=pattern,
                                     calibration=cal, channel_permutation=permute)
            solve_time[0] = 0.0
            before = rss_now()
            result = Pruner(model, tokenizer).prune(config, progress=False)
            run = result.report["run"]
            ppl = perplexity(model, tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.eval_windows,
                             batch_size=8)
            extra = (run["peak_rss_bytes"] - before) / 2**20 if run["peak_rss_bytes"] else float("nan")
            share = f"{100 * solve_time[0] / run['time_s']:.0f}%" if method == "sparsegpt" else "-"
            rows.append([method, pattern + (" +perm" if permute else ""), f"{result.sparsity:.4f}", f"{ppl:.3f}", f"{run['time_s']:.2f}",
                         f"{run['time_s'] / forward_s:.1f}", share, f"{run['peak_rss_bytes'] / 2**20:.0f}",
                         f"{extra:.0f}"])
            del model
    sparsegpt_config.sparsegpt_prune = original
    print(format_table(rows, ["method", "pattern", "sparsity", "perplexity", "time (s)", "x fwd", "solve %",
                              "peak RSS (MiB)", "+RSS (MiB)"]))


if __name__ == "__main__":
    main()
