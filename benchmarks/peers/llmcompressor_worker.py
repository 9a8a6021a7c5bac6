"""Runs inside llmcompressor's own virtual environment (it pins other transformers versions): one-shot prune
of a saved model with llmcompressor on the given calibration token windows. Prints one JSON line with the prune
time and the peak RSS of the prune (the high-water mark is reset after the model is loaded). Never imports
hf_prune."""

from __future__ import annotations

import argparse
import json
import time

import torch
from measure import page_in, peak_rss, rss_now  # this folder is sys.path[0] when a worker runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", required=True, help="a .pt file holding an [N, T] LongTensor of token ids")
    parser.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import MagnitudePruningModifier, WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.load(args.calibration)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    structure = "0:0" if args.pattern == "unstructured" else args.pattern
    targets, ignore = ["Linear"], ["re:.*lm_head"]
    if args.method == "magnitude":
        if args.pattern != "unstructured":
            print(json.dumps({"error": "its magnitude modifier has no N:M mode"}))
            return
        recipe = MagnitudePruningModifier(targets=["re:.*layers.*_proj"], init_sparsity=args.sparsity,
                                          final_sparsity=args.sparsity, start=0, end=0, update=1,
                                          leave_enabled=False)
    elif args.method == "wanda":
        recipe = WandaPruningModifier(sparsity=args.sparsity, mask_structure=structure, targets=targets, ignore=ignore)
    else:
        recipe = SparseGPTModifier(sparsity=args.sparsity, mask_structure=structure, targets=targets, ignore=ignore,
                                   block_size=128, dampening_frac=0.01)
    page_in(model)
    before = rss_now()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=[recipe], num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    rss = peak_rss()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"prune_s": seconds, "peak_rss_bytes": rss, "rss_before_bytes": before}))


if __name__ == "__main__":
    main()
