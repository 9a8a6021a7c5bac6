"""Data-free calibration: sequences sampled from a causal language model itself.

Ancestral sampling with the KV cache, from the model's BOS token, at a given temperature, with a private
``torch.Generator`` (the global RNG is untouched), in batches. The result has the same shape as any other
calibration set (``input_ids`` + ``attention_mask`` batches, every token real) and a provenance record.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.walker import calibration_mode, model_device
from ..errors import CalibrationDataError
from .data import CalibrationSet


def _start_token(model: nn.Module, tokenizer: Any) -> int:
    for owner in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        token = getattr(owner, "bos_token_id", None) if owner is not None else None
        if isinstance(token, int):
            return token
        if isinstance(token, (list, tuple)) and token:
            return int(token[0])
    raise CalibrationDataError(
        "data-free calibration starts every sequence from the model's BOS token, but neither the model's "
        "config nor its tokenizer defines bos_token_id; pass calibration data instead.")


@torch.no_grad()
def sample_sequences(model: nn.Module, *, num_samples: int, seq_len: int, batch_size: int, seed: int,
                     temperature: float = 1.0, tokenizer: Any = None) -> CalibrationSet:
    """``num_samples`` sequences of exactly ``seq_len`` tokens sampled from ``model`` (a causal LM).

    Token 0 of every sequence is BOS; each next token is drawn from softmax(logits / temperature).
    Runs where the model's weights are (the model is not moved). Deterministic for a seed (on a given device
    and software stack)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0.")
    device = model_device(model)
    start = _start_token(model, tokenizer)
    vocab = model.get_output_embeddings().out_features if model.get_output_embeddings() is not None else None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batches = []
    with calibration_mode(model):
        for first in range(0, num_samples, batch_size):
            rows = min(batch_size, num_samples - first)
            ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
            out = model(input_ids=ids, use_cache=True)
            tokens = [ids]
            while len(tokens) < seq_len:
                logits = out.logits[:, -1, :vocab].float() / temperature
                probs = torch.softmax(logits, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator).to(device)
                tokens.append(nxt)
                if len(tokens) < seq_len:
                    out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            seqs = torch.cat(tokens, 1).cpu()
            batches.append({"input_ids": seqs, "attention_mask": torch.ones_like(seqs)})
    provenance = {"source": "self-generated", "generator": "ancestral sampling from the model being pruned",
                  "start_token": start, "temperature": temperature, "num_samples": num_samples,
                  "seq_len": seq_len, "seed": seed, "batch_size": batch_size, "packing": "generated",
                  "real_tokens": num_samples * seq_len}
    return CalibrationSet(batches, provenance)
