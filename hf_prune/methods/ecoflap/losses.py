"""The losses ECoFLaP scores with, one per kind of model, chosen from the model and the batch.

- ``causal_lm``: a causal LM's own next-token cross-entropy (padding ignored): per-token values in
  float32 from float32 logits, averaged in float64.
- the family's own loss (``Family.loss``, defined in its ``hf_prune.models`` file), where it declares one:
  ``caption_lm``, BLIP-2's captioning loss: the same next-token loss on the text tokens, with the image
  placeholder positions (where the Q-Former outputs go) and the padding ignored; ``clip_contrastive``, CLIP
  with images and texts: its symmetric contrastive loss over the batch.
- ``model_loss``: the batches carry ``labels``: the model's own loss (e.g. an image classifier).
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

from ...errors import CalibrationDataError
from ...models import Family, FamilyLoss
from ...models.losses import language_model_loss, without_labels
from ...registry import display_name
from .config import ECoFLaPConfig

DESCRIPTIONS = {
    "causal_lm": "the model's next-token cross-entropy on the calibration text (padding ignored)",
    "model_loss": "the model's own loss on the labels carried by the calibration batches",
    "output_sensitivity": "label-free output sensitivity: zeroth order ||f(W+eps z)-f(W)||/eps (one-sided), first "
                          "order a random projection <u, f> of the outputs f on the real tokens",
}


@dataclass
class ScoringLoss:
    """What stage 1 differentiates (or differences): ``value`` for real losses, ``outputs`` if label-free.
    ``own``: the family's own loss (``Family.loss``) when the model is scored with it."""

    kind: str
    own: FamilyLoss | None = None

    @property
    def label_free(self) -> bool:
        return self.kind == "output_sensitivity"

    @property
    def description(self) -> str:
        return self.own.description if self.own is not None else DESCRIPTIONS[self.kind]

    @property
    def requires(self) -> tuple[str, ...]:
        """Batch keys every scoring batch must carry."""
        if self.own is not None:
            return self.own.requires
        return ("input_ids",) if self.kind == "causal_lm" else ()

    def value(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The scalar loss of one batch (float64)."""
        if self.own is not None:
            return self.own.value(model, batch)
        if self.kind == "causal_lm":
            return language_model_loss(model, batch)
        if self.kind == "model_loss":
            loss = getattr(model(**batch), "loss", None)
            if loss is None:
                raise CalibrationDataError(f"{type(model).__name__} returned no loss for batches with 'labels'; "
                                           "drop the labels to score with the label-free loss.")
            return loss.double()
        raise RuntimeError(f"the {self.kind} loss has no scalar value; use outputs()")

    def outputs(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The label-free outputs ``f``: ``[real tokens (or samples), features]`` in float32."""
        inputs = without_labels(batch)
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


def choose_loss(model: nn.Module, family: Family, batch: dict) -> ScoringLoss:
    """The scoring loss for this model and these batches (see the module docstring): the family's own loss where
    it declares one (before the generic losses, or only instead of the label-free one), else the generic ones."""
    own = family.loss
    scorer = display_name(ECoFLaPConfig.method)
    if own is not None and own.first and own.select(model, batch, scorer):
        return ScoringLoss(own.kind, own)
    if family.causal_lm and model.get_output_embeddings() is not None and "input_ids" in batch:
        return ScoringLoss("causal_lm")
    if "labels" in batch:
        return ScoringLoss("model_loss")
    if own is not None and not own.first and own.select(model, batch, scorer):
        return ScoringLoss(own.kind, own)
    return ScoringLoss("output_sensitivity")


def check_batches(loss: ScoringLoss, batches: list[dict]) -> None:
    """Every batch must suit the chosen loss (e.g. CLIP's contrastive loss needs >= 2 pairs in each)."""
    if loss.own is not None:
        loss.own.check(batches)
    for b in batches:
        for key in loss.requires:
            if key not in b:
                raise CalibrationDataError(f"the {loss.kind} loss needs {key} in every scoring batch; a batch has "
                                           f"only {sorted(b)}.")


def describe(loss: ScoringLoss) -> dict[str, Any]:
    return {"kind": loss.kind, "description": loss.description, "label_free": loss.label_free}
