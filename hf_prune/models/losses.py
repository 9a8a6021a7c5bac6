"""Losses of a model on one batch, as pure functions of the model's outputs and the batch: the next-token loss
every language model (and BLIP-2's captioning) is trained with, and the labels it is computed on. Families'
own losses (``Family.loss``) and loss-scoring methods (ECoFLaP) share them."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CalibrationDataError


def without_labels(batch: dict) -> dict:
    """The model inputs of a batch: everything but its ``labels``."""
    return {k: v for k, v in batch.items() if k != "labels"}


def token_labels(batch: dict, ignore_token: int | None = None) -> torch.Tensor:
    """Next-token labels of a batch: its ``input_ids``, with padding (``attention_mask`` 0) and every
    ``ignore_token`` (e.g. BLIP-2's image placeholders) set to -100, the index the loss ignores."""
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"].to(labels.device) == 0] = -100
    if ignore_token is not None:
        labels[batch["input_ids"] == ignore_token] = -100
    return labels


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the labelled tokens: per-token values in float32, their mean in float64, so
    that the tiny loss differences of zeroth-order scoring are not lost to a float32 accumulation.

    The logits are read in place (a contiguous view; the last position gets the ignored label) instead of being
    sliced and copied first: the same per-token values summed in the same order, about half the time."""
    batch, length, vocab = logits.shape
    logits = logits.float()
    target = torch.full((batch, length), -100, dtype=labels.dtype, device=logits.device)
    target[:, :-1] = labels[:, 1:].to(logits.device)
    nll = nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=-100,
                                      reduction="none").view(batch, length)[:, :-1]
    count = int((target != -100).sum())
    if count == 0:
        raise CalibrationDataError("a scoring batch has no token to predict (all padding or image placeholders); "
                                   "give longer calibration texts.")
    return nll.double().sum() / count


def language_model_loss(model: nn.Module, batch: dict, ignore_token: int | None = None) -> torch.Tensor:
    """The next-token loss of ``model`` on ``batch``: on the batch's ``labels`` when it carries some, else on its
    tokens (padding and ``ignore_token`` ignored)."""
    logits = model(**without_labels(batch)).logits
    labels = batch["labels"] if "labels" in batch else token_labels(batch, ignore_token)
    return next_token_loss(logits, labels)


def seq2seq_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """An encoder-decoder's loss on ``batch``: the decoder predicts the batch's ``labels`` or, without them, its
    own ``input_ids`` (padding ignored) from the encoder's reading of them, with teacher forcing (the model shifts
    the labels into decoder inputs itself); per-token NLL in float32, its mean in float64."""
    labels = batch["labels"] if "labels" in batch else token_labels(batch)
    logits = model(**without_labels(batch), labels=labels).logits.float()
    target = labels.to(logits.device).reshape(-1)
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=-100,
                                      reduction="none")
    count = int((target != -100).sum())
    if count == 0:
        raise CalibrationDataError("a scoring batch has no token to predict (all padding); give longer calibration "
                                   "texts.")
    return nll.double().sum() / count
