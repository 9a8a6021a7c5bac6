"""Evaluation with pinned protocols: perplexity as the pruning papers compute it, and sparsity reports.

Perplexity protocol (Wanda / SparseGPT): the texts are joined by ``"\\n\\n"`` in their given order,
tokenised once (with the tokenizer's default special tokens), cut into non-overlapping windows of
exactly ``seq_len`` tokens (the remainder is dropped, no stride), and the perplexity is
exp(mean next-token NLL) over every predicted token of every window, accumulated in float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .calibration.config import context_note, fit_seq_len
from .calibration.data import load_texts, text_tokenizer
from .engine.report import aggregate, model_totals, module_entry
from .engine.walker import model_device
from .models import text_context

PERPLEXITY_PROTOCOL = {
    "joiner": "\\n\\n",
    "tokenization": "once, default special tokens",
    "window_rule": "non-overlapping, exactly seq_len tokens, remainder dropped, no stride",
    "metric": "exp(mean next-token NLL over all predicted tokens)",
}


def perplexity_windows(tokenizer: Any, texts_or_dataset: Any, *, seq_len: int, text_column: str = "text",
                       split: str = "test") -> tuple[torch.Tensor, dict]:
    """The evaluation windows ([n, seq_len] token ids) and a record of how they were made."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} must be an integer >= 2.")
    texts, provenance = load_texts(texts_or_dataset, text_column=text_column, split=split, purpose="evaluation")
    if not texts:
        raise ValueError("the evaluation data holds no text.")
    ids = text_tokenizer(tokenizer)("\n\n".join(texts), verbose=False)["input_ids"]
    windows = len(ids) // seq_len
    if windows == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than seq_len={seq_len}; give more "
                         "text or lower seq_len.")
    data = torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)
    return data, {**provenance, "split": split, "seq_len": seq_len, "windows": windows, "tokens": len(ids),
                  **PERPLEXITY_PROTOCOL}


def eval_seq_len(model: nn.Module, seq_len: int | None) -> int:
    """The window length to evaluate ``model`` with: ``seq_len`` when it fits the model's context, the context
    itself when ``seq_len`` is None and the context is shorter than 2048 (else 2048); a ``seq_len`` past the
    context is a ``SequenceLengthError`` naming both numbers."""
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2):
        raise ValueError(f"seq_len={seq_len!r} must be an integer >= 2, or None for the model's context.")
    return fit_seq_len(seq_len, text_context(model))


def check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")


def perplexity(model: nn.Module, tokenizer: Any, texts_or_dataset: Any, *, seq_len: int | None = None,
               batch_size: int = 1, text_column: str = "text", split: str = "test",
               max_windows: int | None = None, progress: bool = False) -> float:
    """Perplexity of a causal LM on ``texts_or_dataset`` with the pinned protocol of this module.

    ``texts_or_dataset``: a list of strings, a ``datasets.Dataset``, a local file, ``"builtin:python-docs"``
    (its ``test`` split by default) or a Hub dataset name. ``max_windows`` caps the number of windows.
    ``seq_len``: the window length (default: the model's context, at most 2048; see ``eval_seq_len``).
    """
    check_batch_size(batch_size)
    seq_len = eval_seq_len(model, seq_len)
    data, _ = perplexity_windows(tokenizer, texts_or_dataset, seq_len=seq_len, text_column=text_column, split=split)
    return _windows_perplexity(model, data[:max_windows] if max_windows is not None else data,
                               batch_size=batch_size, progress=progress)


@torch.no_grad()
def _windows_perplexity(model: nn.Module, data: torch.Tensor, *, batch_size: int, progress: bool) -> float:
    from tqdm.auto import tqdm

    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for chunk in tqdm(data.split(batch_size), desc="perplexity", disable=not progress, leave=False):
            chunk = chunk.to(device)
            out = model(input_ids=chunk, use_cache=False)
            logits = getattr(out, "logits", None)
            if logits is None or logits.dim() != 3:
                raise ValueError(f"perplexity needs a causal language model that returns logits; "
                                 f"{type(model).__name__} does not.")
            nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                              chunk[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll.double())
            total_tokens += chunk[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def perplexity_record(model: nn.Module, tokenizer: Any, texts_or_dataset: Any, *, seq_len: int | None = None,
                      dense: float | None = None, batch_size: int = 1, text_column: str = "text",
                      split: str = "test", max_windows: int | None = None, progress: bool = False) -> dict:
    """Measure ``perplexity`` and return it as an evaluation record for model cards
    (``Pruner.save_pretrained(evaluations=[...])``): metric, value, the ``dense`` value measured before pruning
    with the same arguments (optional), dataset, split, seq_len, the number of windows used and the protocol."""
    if dense is not None and (isinstance(dense, bool) or not isinstance(dense, (int, float))):
        raise ValueError(f"dense={dense!r} must be the dense model's perplexity (a number) or None.")
    check_batch_size(batch_size)
    seq_len = eval_seq_len(model, seq_len)
    data, record = perplexity_windows(tokenizer, texts_or_dataset, seq_len=seq_len, text_column=text_column,
                                      split=split)
    windows = min(len(data), max_windows or len(data))
    value = _windows_perplexity(model, data[:windows], batch_size=batch_size, progress=progress)
    protocol = {**PERPLEXITY_PROTOCOL, "windows": f"the first {windows} of {len(data)}",
                "tokens_in_text": record["tokens"]}
    note = context_note(seq_len, text_context(model))
    if note:
        protocol["seq_len"] = note
    return {"metric": "perplexity", "value": round(value, 4), "dense": None if dense is None else round(dense, 4),
            "dataset": str(record.get("source") or "<in-memory texts>"), "split": split, "seq_len": seq_len,
            "windows": windows, "task": "text-generation", "protocol": protocol}


def sparsity_report(model: nn.Module, modules: str | None = None) -> dict:
    """Zeros in every ``nn.Linear`` weight (or only those whose name contains ``modules``), per module and
    overall, plus totals over all parameters."""
    entries = {name: module_entry(m.weight.detach(), None, None) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and (modules is None or modules in name)}
    return {"overall": aggregate(entries), "per_module": entries, "model_totals": model_totals(model)}
