"""What the examples share: command-line options, loading the model, and publishing the result.

Every example runs offline on a laptop CPU. By default the model is the project's shared trained decoder
(``../shared/models/pylm`` next to the checkout: Qwen3-shaped, 4.2M parameters, trained on Python source),
calibrated on ``pylm-data/calibration.txt`` and measured on ``pylm-data/heldout.txt`` (never trained on). Where
that folder is absent, or with ``--model toy``, it is hf_prune.toy's tiny LLaMA, trained once on the prose of
Python's own docstrings (``builtin:python-docs``, train split) and cached, measured on the disjoint test split.
``--model`` takes any Hub id or local folder of a causal LM instead (with ``builtin:python-docs`` unless
``--calibration`` / ``--eval`` say otherwise).
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import torch

from hf_prune import Pruner
from hf_prune.evaluation import perplexity, perplexity_record, perplexity_windows

TEXTS = "builtin:python-docs"  # calibration uses its train split, evaluation its test split
SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "models"))
PYLM = os.path.join(SHARED, "pylm")
PYLM_DATA = os.path.join(SHARED, "pylm-data")


class ExampleParser(argparse.ArgumentParser):
    """Fills in the data the model goes with: the shared decoder's own text for it, ``builtin:python-docs``
    otherwise."""

    def parse_args(self, *args, **kwargs):
        ns = super().parse_args(*args, **kwargs)
        if ns.model == "toy":
            ns.model = None
        shared = ns.model is not None and os.path.abspath(ns.model) == PYLM
        ns.calibration = ns.calibration or (os.path.join(PYLM_DATA, "calibration.txt") if shared else TEXTS)
        ns.eval = ns.eval or (os.path.join(PYLM_DATA, "heldout.txt") if shared else TEXTS)
        return ns


def parser(description: str, *, sparsity: float = 0.5, pattern: str = "unstructured") -> argparse.ArgumentParser:
    """The options every example takes."""
    p = ExampleParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = PYLM if os.path.isdir(PYLM) else None
    p.add_argument("--model", default=default, help="Hub id or folder of a causal LM, or 'toy' (default: the shared "
                                                    "trained decoder ../shared/models/pylm when present, else "
                                                    "hf_prune.toy's tiny LLaMA)")
    p.add_argument("--calibration", default=None, help="calibration (and training) text (default: pylm-data/"
                                                       "calibration.txt for the shared decoder, else builtin:python-docs)")
    p.add_argument("--eval", default=None, help="held-out text (default: pylm-data/heldout.txt for the shared decoder, "
                                                "else builtin:python-docs's test split)")
    p.add_argument("--sparsity", type=float, default=sparsity, help="fraction of weights removed (unstructured)")
    p.add_argument("--pattern", default=pattern, help="'unstructured' or N:M, e.g. 2:4 (implies the sparsity)")
    p.add_argument("--num-samples", type=int, default=64, help="calibration samples")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per calibration sample and evaluation window")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows for perplexity")
    p.add_argument("--output", default=None, help="folder to save the pruned model, report, picture and card to")
    p.add_argument("--push-to", default=None, metavar="REPO", help="also push to this Hub repo (needs network/token)")
    return p


def load(model: str | None) -> Pruner:
    if model is None:
        from hf_prune.toy import toy_causal_lm

        return Pruner(*toy_causal_lm("tiny"))
    return Pruner.from_pretrained(model, dtype=torch.float32)


def training_windows(tokenizer, seq_len: int, count: int, source: str = TEXTS) -> torch.Tensor:
    """``count`` random windows ([count, seq_len] token ids, seed 0) of ``source`` (the train split of
    ``builtin:python-docs``), cut exactly as the evaluation cuts the held-out text."""
    windows, _ = perplexity_windows(tokenizer, source, seq_len=seq_len, split="train")
    return windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[:count]]


def sparsity_arg(args: argparse.Namespace) -> float | None:
    """The ``sparsity`` field to pass: None for N:M (the pattern fixes it)."""
    return None if args.pattern != "unstructured" else args.sparsity


def dense_perplexity(pruner: Pruner, args: argparse.Namespace) -> float:
    value = perplexity(pruner.model, pruner.tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.eval_windows)
    print(f"dense perplexity: {value:.3f}")
    return value


def publish(pruner: Pruner, args: argparse.Namespace, dense: float, *, finetuning: dict | None = None,
            label: str = "pruned") -> dict:
    """Measure the pruned model's perplexity next to the dense one, then save and/or push with the card."""
    record = perplexity_record(pruner.model, pruner.tokenizer, args.eval, seq_len=args.seq_len, dense=dense,
                               max_windows=args.eval_windows)
    print(f"perplexity on {args.eval} (held out, {record['windows']} x {args.seq_len} tokens): "
          f"dense {dense:.3f} -> {label} {record['value']:.3f}")
    if args.output:
        path = pruner.save_pretrained(args.output, evaluations=[record], finetuning=finetuning)
        print(f"saved to {path} (model, tokenizer, pruning_config.json, pruning_report.json, picture, README.md)")
    if args.push_to:
        info = pruner.push_to_hub(args.push_to, evaluations=[record], finetuning=finetuning)
        print(f"pushed to {info.repo_url}: {info.commit_url}")
    return record


def run(description: str, make_config, *, options=None, argv: Sequence[str] | None = None) -> None:
    """The whole one-shot flow: parse the options (``options(parser)`` adds a method's own), load the model,
    measure its perplexity, prune with ``make_config(args)``, print the report, then save/push with the card."""
    p = parser(description)
    if options is not None:
        options(p)
    args = p.parse_args(argv)
    pruner = load(args.model)
    dense = dense_perplexity(pruner, args)
    result = pruner.prune(make_config(args), calibration_dataset=args.calibration, progress=False)
    print(result.summary())
    publish(pruner, args, dense)
