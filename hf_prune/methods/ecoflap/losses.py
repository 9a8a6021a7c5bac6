"""The losses ECoFLaP scores with, one per kind of model, chosen from the model and the batch.

- ``causal_lm``: a causal LM's own next-token cross-entropy (padding ignored): per-token values in
  float32 from float32 logits, averaged in float64.
- ``caption_lm``: BLIP-2's captioning loss: the same next-token loss on the text tokens, with the image
  placeholder positions (where the Q-Former outputs go) and the padding ignored.
- ``model_loss``: the batches carry ``labels``: the model's own loss (e.g. an image classifier).
- ``clip_contrastive``: CLIP with images and texts: its symmetric contrastive loss over the batch.
- ``output_sensitivity``: no labels (BERT encoders, CLIP's single towers, ViT without labels). The
  obvious choice, the distance of perturbed outputs to the dense outputs, is useless as written: it is
  minimal at the dense weights, so its gradient is zero there and its two-sided difference is
  O(eps^2) noise. Instead, with ``f`` the model's output on the real tokens:

  * zeroth order, one-sided: ``||f(W + eps z) - f(W)|| / eps = ||J z|| + O(eps)``, whose square has
    expectation ``||J_W||_F^2`` over z ~ N(0, I) (J: the Jacobian of the outputs w.r.t. the perturbed
    weights): the same role as |<grad L, z>| for a real loss, at one perturbed forward per direction;
  * first order, a random projection: ``L = <u, f> / sqrt(tokens)`` with u ~ N(0, I) from a private
    generator, so ``dL/dW = J^T u`` and ``|W_ij| * |dL/dW_ij|`` has expectation proportional to
    ``|W_ij| * ||df/dW_ij||``, the first-order change of the outputs when ``W_ij`` is removed.

  ``f`` is the classifier's logits if it has some, else the last hidden state (per real token), or CLIP's
  projected embedding of the one modality present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...models import Family
from ...errors import CalibrationDataError

DESCRIPTIONS = {
    "causal_lm": "the model's next-token cross-entropy on the calibration text (padding ignored)",
    "caption_lm": "BLIP-2's caption loss: next-token cross-entropy on the text tokens (image placeholders and "
                  "padding ignored)",
    "model_loss": "the model's own loss on the labels carried by the calibration batches",
    "clip_contrastive": "CLIP's symmetric image-text contrastive loss over each batch",
    "output_sensitivity": "label-free output sensitivity: zeroth order ||f(W+eps z)-f(W)||/eps (one-sided), first "
                          "order a random projection <u, f> of the outputs f on the real tokens",
}


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the labelled tokens: per-token values in float32, their mean in float64, so
    that the tiny loss differences of zeroth-order scoring are not lost to a float32 accumulation."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device).reshape(-1)
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=-100,
                                      reduction="none")
    count = int((target != -100).sum())
    if count == 0:
        raise CalibrationDataError("a scoring batch has no token to predict (all padding or image placeholders); "
                                   "give longer calibration texts.")
    return nll.double().sum() / count


@dataclass
class ScoringLoss:
    """What stage 1 differentiates (or differences): ``value`` for real losses, ``outputs`` if label-free."""

    kind: str
    image_token_id: int | None = None

    @property
    def label_free(self) -> bool:
        return self.kind == "output_sensitivity"

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.kind]

    def value(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The scalar loss of one batch (float64)."""
        if self.kind in ("causal_lm", "caption_lm"):
            logits = model(**_inputs(batch)).logits
            labels = batch["labels"] if "labels" in batch else self.labels(batch)
            return _next_token_loss(logits, labels)
        if self.kind == "clip_contrastive":
            return model(**_inputs(batch), return_loss=True).loss.double()
        if self.kind == "model_loss":
            loss = getattr(model(**batch), "loss", None)
            if loss is None:
                raise CalibrationDataError(f"{type(model).__name__} returned no loss for batches with 'labels'; "
                                           "drop the labels to score with the label-free loss.")
            return loss.double()
        raise RuntimeError(f"the {self.kind} loss has no scalar value; use outputs()")

    def labels(self, batch: dict) -> torch.Tensor:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"].to(labels.device) == 0] = -100
        if self.image_token_id is not None:
            labels[batch["input_ids"] == self.image_token_id] = -100
        return labels

    def outputs(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The label-free outputs ``f``: ``[real tokens (or samples), features]`` in float32."""
        inputs = _inputs(batch)
        has_text, has_image = "input_ids" in inputs, "pixel_values" in inputs
        if hasattr(model, "get_image_features") and hasattr(model, "get_text_features") and has_text != has_image:
            out = model.get_image_features(pixel_values=inputs["pixel_values"]) if has_image else \
                model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            out = getattr(out, "pooler_output", out)
            return out.float().reshape(out.shape[0], -1)
        out = model(**inputs)
        tensor = out if torch.is_tensor(out) else None
        for key in ("logits", "last_hidden_state") if tensor is None else ():
            value = getattr(out, key, None) if not isinstance(out, dict) else out.get(key)
            if torch.is_tensor(value):
                tensor = value
                break
        if tensor is None:
            tensor = out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]
        mask = inputs.get("attention_mask")
        if mask is not None and tensor.dim() == 3 and tuple(tensor.shape[:2]) == tuple(mask.shape):
            tensor = tensor[mask.to(tensor.device).bool()]
        return tensor.float().reshape(-1, tensor.shape[-1])


def _is_clip_pair(model: nn.Module, family: Family, batch: dict) -> bool:
    return (family.name == "clip" and hasattr(model, "logit_scale") and "input_ids" in batch
            and "pixel_values" in batch)


def choose_loss(model: nn.Module, family: Family, batch: dict) -> ScoringLoss:
    """The scoring loss for this model and these batches (see the module docstring)."""
    if family.name == "blip-2":
        if model.get_output_embeddings() is None or "input_ids" not in batch:
            raise CalibrationDataError("ECoFLaP scores BLIP-2 with its caption loss, which needs "
                                       "Blip2ForConditionalGeneration and batches with pixel_values and input_ids.")
        config = model.config
        token = getattr(config, "image_token_id", None)
        if token is None:
            token = getattr(config, "image_token_index", None)
        return ScoringLoss("caption_lm", image_token_id=token)
    if family.causal_lm and model.get_output_embeddings() is not None and "input_ids" in batch:
        return ScoringLoss("causal_lm")
    if "labels" in batch:
        return ScoringLoss("model_loss")
    if _is_clip_pair(model, family, batch):
        sizes = [batch["input_ids"].shape[0], batch["pixel_values"].shape[0]]
        if min(sizes) < 2:
            raise CalibrationDataError(
                "CLIP is scored with its contrastive loss, which needs at least 2 image-text pairs per batch "
                f"(a batch has {min(sizes)}); raise CalibrationConfig.batch_size.")
        return ScoringLoss("clip_contrastive")
    return ScoringLoss("output_sensitivity")


def check_batches(loss: ScoringLoss, batches: list[dict]) -> None:
    """Every batch must suit the chosen loss (CLIP's contrastive loss needs >= 2 pairs in each)."""
    if loss.kind == "clip_contrastive":
        small = [b["input_ids"].shape[0] for b in batches if b["input_ids"].shape[0] < 2]
        if small:
            raise CalibrationDataError(
                "CLIP is scored with its contrastive loss, which needs at least 2 image-text pairs per batch, but "
                f"a batch has {small[0]}; raise CalibrationConfig.batch_size or num_score_samples.")
    for b in batches:
        if loss.kind in ("causal_lm", "caption_lm") and "input_ids" not in b:
            raise CalibrationDataError(f"the {loss.kind} loss needs input_ids in every scoring batch; a batch has "
                                       f"only {sorted(b)}.")


def describe(loss: ScoringLoss) -> dict[str, Any]:
    return {"kind": loss.kind, "description": loss.description, "label_free": loss.label_free}
