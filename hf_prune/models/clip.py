"""CLIP: two independent towers (vision, text), or one standalone tower."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import CalibrationDataError
from .losses import without_labels
from .spec import (
    FC_MLP,
    AttentionSpec,
    Family,
    FamilyLoss,
    Stage,
    first_existing,
    model_type_of,
    patch_tokens,
    register_family,
)

ATTENTION = AttentionSpec("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                          module="self_attn", heads_attr="num_heads", scaling_attr="scale")


def _run_vision(model: nn.Module, batch: dict) -> Any:
    return model.vision_model(pixel_values=batch["pixel_values"])


def _run_text(model: nn.Module, batch: dict) -> Any:
    return model.text_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))


def _run_tower_vision(model: nn.Module, batch: dict) -> Any:
    return model(pixel_values=batch["pixel_values"])


def _run_tower_text(model: nn.Module, batch: dict) -> Any:
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))


def _stages(model: nn.Module) -> list[Stage]:
    stages = []
    if first_existing(model, ("vision_model.encoder.layers",)):
        stages.append(Stage("vision", "vision_model.encoder.layers", run=_run_vision,
                            requires=("pixel_values",), mask_key=None, mlp=FC_MLP, attention=ATTENTION,
                            config_attr="vision_config", tokens=patch_tokens))
    if first_existing(model, ("text_model.encoder.layers",)):
        stages.append(Stage("text", "text_model.encoder.layers", run=_run_text, mlp=FC_MLP,
                            attention=ATTENTION, config_attr="text_config"))
    if not stages and first_existing(model, ("encoder.layers",)):  # a standalone tower (transformers 5 layout)
        if model_type_of(model) == "clip_vision_model":
            stages.append(Stage("vision", "encoder.layers", run=_run_tower_vision, requires=("pixel_values",),
                                mask_key=None, mlp=FC_MLP, attention=ATTENTION, tokens=patch_tokens))
        elif model_type_of(model) == "clip_text_model":
            stages.append(Stage("text", "encoder.layers", run=_run_tower_text, mlp=FC_MLP, attention=ATTENTION))
    return stages


def _contrastive_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**without_labels(batch), return_loss=True).loss.double()


def _scores_contrastively(model: nn.Module, batch: dict, scorer: str) -> bool:
    """Both towers (``CLIPModel``) on batches of images with their texts; the contrast needs two pairs or more."""
    if not (hasattr(model, "logit_scale") and "input_ids" in batch and "pixel_values" in batch):
        return False
    pairs = min(batch["input_ids"].shape[0], batch["pixel_values"].shape[0])
    if pairs < 2:
        raise CalibrationDataError(
            "CLIP is scored with its contrastive loss, which needs at least 2 image-text pairs per batch "
            f"(a batch has {pairs}); raise CalibrationConfig.batch_size.")
    return True


def _check_pairs(batches: list[dict]) -> None:
    small = [b["input_ids"].shape[0] for b in batches if b["input_ids"].shape[0] < 2]
    if small:
        raise CalibrationDataError(
            "CLIP is scored with its contrastive loss, which needs at least 2 image-text pairs per batch, but "
            f"a batch has {small[0]}; raise CalibrationConfig.batch_size or num_score_samples.")


CONTRASTIVE_LOSS = FamilyLoss("clip_contrastive", "CLIP's symmetric image-text contrastive loss over each batch",
                              value=_contrastive_loss, select=_scores_contrastively, check=_check_pairs)

FAMILY = register_family(Family("clip", ("clip", "clip_vision_model", "clip_text_model"), resolve=_stages,
                                loss=CONTRASTIVE_LOSS, pipeline_tags={"CLIPModel": "zero-shot-image-classification"}))
