"""ECoFLaP's stage 1, zeroth- vs first-order vs uniform: score time, peak memory, quality at 50/60/70%.

    python benchmarks/ecoflap.py                      # shared trained decoder for quality + a random 8-layer LLaMA for memory
    python benchmarks/ecoflap.py --skip-memory --model toy --seq-len 128 --eval-windows 64   # the toy LLaMA's quality
    python benchmarks/ecoflap.py --device cuda --memory-layers 16 --memory-hidden 2048 --memory-dtype bfloat16
    python benchmarks/ecoflap.py --skip-quality --memory-model pylm   # the cost table on the shared trained decoder

Two tables:

1. Cost of the scores, each scorer in its own fresh process on a larger random LLaMA (only the toy's
   tokenizer is reused), or with ``--memory-model pylm`` (or a folder) on a trained causal LM and its own
   tokenizer (calibration: pylm-data/calibration.txt unless ``--calibration``): wall time, forward/backward passes, and peak memory next to that of a plain
   forward pass over the same batches (the reference the goals are stated against: zeroth order within
   +10%, first order within 1.5x). CPU: peak RSS (VmHWM, reset after loading); CUDA: max allocated.
   "x fwd" compares totals (weights included); "extra x fwd" compares what each needs above the loaded
   model, which on a small model is the stricter view.
2. Quality: perplexity of ``--model`` (default: the shared trained decoder ../shared/models/pylm, calibrated on
   pylm-data/calibration.txt, evaluated on pylm-data/heldout.txt; ``toy``: hf_prune.toy's LLaMA on
   builtin:python-docs) after uniform Wanda and after ECoFLaP + Wanda with each scorer, at each sparsity.

Prints tables; never asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from oneshot import rss_bytes  # noqa: E402  (this folder is on sys.path when a script here runs)
from pylm_paths import PYLM, PYLM_DATA  # noqa: E402  (this folder is on sys.path when a script here runs)

from hf_prune import CalibrationConfig, ECoFLaPConfig, Pruner, WandaConfig  # noqa: E402
from hf_prune.engine.report import _reset_vm_hwm, _vm_hwm_bytes, format_table  # noqa: E402

SCORERS = {  # name -> ECoFLaPConfig overrides
    "zeroth_order/tensor": dict(score="zeroth_order", zo_perturb="tensor", zo_stop_tol=None),
    "zeroth_order/block": dict(score="zeroth_order", zo_perturb="block", zo_stop_tol=None),
    "first_order": dict(score="first_order"),
}


# ------------------------------------------------------------------------------------------------ memory (child)


def _memory_model(args, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.memory_model != "random":
        model = Pruner.from_pretrained(_memory_path(args), dtype=getattr(torch, args.memory_dtype)).model
        return model.to(args.device).eval()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.memory_hidden, intermediate_size=args.memory_hidden * 8 // 3,
                         num_hidden_layers=args.memory_layers, num_attention_heads=args.memory_hidden // 64,
                         num_key_value_heads=args.memory_hidden // 128, max_position_embeddings=max(256, args.seq_len),
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, args.memory_dtype))
    return model.to(args.device).eval()


def _memory_path(args) -> str:
    return PYLM if args.memory_model == "pylm" else args.memory_model


def measure(args) -> dict:
    """One measurement in this (fresh) process: load, reset the peak, run, report."""
    from hf_prune.calibration import build_calibration
    from hf_prune.engine.walker import calibration_mode, to_device
    from hf_prune.methods.ecoflap import allocate
    from hf_prune.methods.ecoflap.losses import ScoringLoss
    from hf_prune.toy import toy_causal_lm

    if args.memory_model == "random":
        _, tokenizer = toy_causal_lm(args.toy_size)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_memory_path(args))
    model = _memory_model(args, len(tokenizer))
    cal = CalibrationConfig(dataset=args.calibration, num_samples=args.memory_samples, seq_len=args.seq_len,
                            batch_size=args.batch_size)
    cuda = args.device.startswith("cuda")
    out = {"what": args.measure, "parameters": sum(p.numel() for p in model.parameters()),
           "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    batches = build_calibration(cal, tokenizer=tokenizer, causal_lm=True).batches
    if cuda:
        torch.cuda.synchronize()
        out["base"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        out["base"] = rss_bytes()
        if not _reset_vm_hwm():
            raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs); run on Linux")
    start = time.perf_counter()
    if args.measure == "forward":
        loss = ScoringLoss("causal_lm")
        with calibration_mode(model):
            for batch in batches:
                float(loss.value(model, to_device(batch, args.device)))
        out["passes"] = {"forward": len(batches), "backward": 0}
    else:
        config = ECoFLaPConfig(sparsity=0.5, num_score_samples=args.memory_samples, calibration=cal,
                               **SCORERS[args.measure])
        allocation = allocate(Pruner(model, tokenizer), config, progress=False)
        out["passes"] = allocation.provenance["passes"]
    if cuda:
        torch.cuda.synchronize()
    out["time_s"] = time.perf_counter() - start
    out["peak"] = torch.cuda.max_memory_allocated() if cuda else _vm_hwm_bytes()
    return out


def memory_table(args) -> None:
    from hf_prune.toy import toy_causal_lm

    if args.memory_model == "random":
        toy_causal_lm(args.toy_size)  # train and cache it here, so every child starts from the same loaded state
    rows, results = [], {}
    for what in ["forward", *SCORERS]:
        cmd = [sys.executable, os.path.abspath(__file__), "--measure", what, "--device", args.device,
               "--memory-layers", str(args.memory_layers), "--memory-hidden", str(args.memory_hidden),
               "--memory-dtype", args.memory_dtype, "--memory-samples", str(args.memory_samples),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--toy-size", args.toy_size,
               "--calibration", args.calibration, "--memory-model", args.memory_model]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"measurement {what} failed")
        results[what] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = results["forward"]
    ref_extra = ref["peak"] - ref["base"]
    for what, r in results.items():
        extra = r["peak"] - r["base"]
        rows.append([what, r["passes"]["forward"], r["passes"]["backward"], f"{r['time_s']:.2f}",
                     f"{r['base'] / 2**20:.0f}", f"{r['peak'] / 2**20:.0f}", f"{r['peak'] / ref['peak']:.3f}",
                     f"{extra / 2**20:.0f}", f"{extra / ref_extra:.2f}"])
    unit = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS"
    what = (f"random LLaMA, {args.memory_layers} layers, hidden {args.memory_hidden}" if args.memory_model == "random"
            else _memory_path(args))
    print(f"Scoring cost: {what}, "
          f"{ref['parameters'] / 1e6:.1f}M parameters ({ref['weights_bytes'] / 2**20:.0f} MiB of {args.memory_dtype} "
          f"weights) on {args.device}; {args.memory_samples} samples x {args.seq_len} tokens, batch {args.batch_size}")
    print(format_table(rows, ["scores", "forwards", "backwards", "time (s)", "loaded (MiB)", f"{unit} (MiB)",
                              "x fwd", "extra (MiB)", "extra x fwd"]))
    print()


# ------------------------------------------------------------------------------------------------ quality


def quality_table(args) -> None:
    from hf_prune.evaluation import perplexity
    from hf_prune.toy import toy_causal_lm

    if args.model == "toy":
        dense, tokenizer = toy_causal_lm(args.toy_size)
        calibration, evaluation = args.calibration or "builtin:python-docs", args.eval or "builtin:python-docs"
        label = f"toy LLaMA '{args.toy_size}' (trained on builtin:python-docs)"
    else:
        base = Pruner.from_pretrained(args.model, dtype=torch.float32)
        dense, tokenizer = base.model, base.tokenizer
        calibration = args.calibration or f"{PYLM_DATA}/calibration.txt"
        evaluation = args.eval or f"{PYLM_DATA}/heldout.txt"
        label = args.model
    seq_len = args.seq_len or (128 if args.model == "toy" else 256)
    dense.eval()
    cal = CalibrationConfig(dataset=calibration, num_samples=args.num_samples, seq_len=seq_len,
                            batch_size=args.batch_size)

    def ppl(model):
        return perplexity(model, tokenizer, evaluation, seq_len=seq_len, max_windows=args.eval_windows,
                          batch_size=8)

    dense_ppl = ppl(dense)
    params = sum(p.numel() for p in dense.parameters())
    print(f"Quality: {label} ({params / 1e6:.2f}M parameters, {dense.config.num_hidden_layers} "
          f"blocks), dense perplexity {dense_ppl:.3f} on {evaluation} "
          f"({args.eval_windows} windows of {seq_len}); calibration {args.num_samples} x {seq_len} tokens of {calibration} "
          f"for Wanda, {args.num_score_samples} for the scores; granularity {args.granularity}")
    rows = []
    for sparsity in args.sparsities:
        model = copy.deepcopy(dense)
        result = Pruner(model, tokenizer).prune(WandaConfig(sparsity=sparsity, calibration=cal), progress=False)
        rows.append([f"{sparsity:.2f}", "uniform (Wanda)", f"{result.sparsity:.4f}", f"{ppl(model):.3f}", "-", "-",
                     f"{result.report['run']['time_s']:.2f}", "-"])
        for name, overrides in SCORERS.items():
            model = copy.deepcopy(dense)
            config = ECoFLaPConfig(sparsity=sparsity, granularity=args.granularity,
                                   num_score_samples=args.num_score_samples, calibration=cal, **overrides)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = Pruner(model, tokenizer).prune(config, progress=False)
            alloc = result.allocation
            run = alloc.provenance["run"]
            groups = [g["sparsity"] for g in alloc.groups.values()]
            rows.append([f"{sparsity:.2f}", f"ECoFLaP {name} + Wanda", f"{result.sparsity:.4f}", f"{ppl(model):.3f}",
                         f"{run['phases_s']['scores']:.2f}", alloc.provenance["passes"]["forward"],
                         f"{result.report['run']['time_s']:.2f}", f"{min(groups):.3f}-{max(groups):.3f}"])
    print(format_table(rows, ["sparsity", "method", "achieved", "perplexity", "score time (s)", "forwards",
                              "total time (s)", "group sparsities"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=PYLM, help="quality table: a causal LM folder or Hub id (default: the shared "
                                                       "trained decoder); 'toy': hf_prune.toy's LLaMA")
    parser.add_argument("--toy-size", default="small", choices=["tiny", "small"])
    parser.add_argument("--calibration", default=None, help="calibration text (default: pylm-data/calibration.txt, "
                                                            "or builtin:python-docs for the toy and the memory table)")
    parser.add_argument("--eval", default=None, help="held-out text (default: pylm-data/heldout.txt, or "
                                                     "builtin:python-docs for the toy)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--num-score-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=None, help="default 256 (128 for the toy and the memory table)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--granularity", default="block", choices=["block", "layer", "submodel"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--device", default="cpu", help="where the memory model runs (cpu or cuda)")
    parser.add_argument("--memory-layers", type=int, default=8)
    parser.add_argument("--memory-hidden", type=int, default=512)
    parser.add_argument("--memory-dtype", default="float32")
    parser.add_argument("--memory-samples", type=int, default=8)
    parser.add_argument("--memory-model", default="random", help="the cost table's model: 'random' (a random LLaMA "
                                                                 "of --memory-layers/--memory-hidden), 'pylm' (the "
                                                                 "shared trained decoder) or a causal LM folder")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one child measurement
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    if not args.skip_memory:
        default_cal = "builtin:python-docs" if args.memory_model == "random" else f"{PYLM_DATA}/calibration.txt"
        memory_table(argparse.Namespace(**{**vars(args), "calibration": args.calibration or default_cal,
                                           "seq_len": args.seq_len or 128}))
    if not args.skip_quality:
        quality_table(args)


if __name__ == "__main__":
    main()
