"""BLIP-2: vision tower -> Q-Former -> language model (any registered causal-LM family)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import CalibrationDataError, UnsupportedModelError
from .losses import language_model_loss
from .spec import (
    FC_MLP,
    AttentionSpec,
    Family,
    FamilyLoss,
    MLPSpec,
    Stage,
    call_model,
    causal_lm_families,
    family_for_type,
    first_existing,
    model_type_of,
    patch_tokens,
    register_family,
)

QFORMER_MLP = MLPSpec(("intermediate_query.dense",), "output_query.dense", "intermediate_size")
QFORMER_ATTENTION = AttentionSpec("attention.attention.query", "attention.attention.key", "attention.attention.value",
                                  "attention.output.dense", module="attention.attention",
                                  head_dim_attr="attention_head_size", heads_attr="num_attention_heads",
                                  total_attr="all_head_size")


def _run_vision(model: nn.Module, batch: dict) -> Any:
    return model.vision_model(pixel_values=batch["pixel_values"])


def _run_qformer(model: nn.Module, batch: dict) -> Any:
    return model.get_image_features(pixel_values=batch["pixel_values"])


def _query_tokens(config: Any, stage_config: Any, seq_len: int) -> int:
    """The Q-Former's blocks carry its learned query tokens, whatever the text length."""
    return int(getattr(config, "num_query_tokens", 32))


def _stages(model: nn.Module) -> list[Stage]:
    stages = []
    if first_existing(model, ("vision_model.encoder.layers",)):  # fused qkv Linear: no attention slicing
        stages.append(Stage("vision", "vision_model.encoder.layers", run=_run_vision,
                            requires=("pixel_values",), mask_key=None, mlp=FC_MLP, config_attr="vision_config",
                            tokens=patch_tokens))
    if first_existing(model, ("qformer.encoder.layer",)):  # self-attention only (cross-attention untouched)
        stages.append(Stage("qformer", "qformer.encoder.layer", run=_run_qformer,
                            requires=("pixel_values",), mask_key=None, mlp=QFORMER_MLP,
                            attention=QFORMER_ATTENTION, config_attr="qformer_config", tokens=_query_tokens))
    language_model = getattr(model, "language_model", None)
    if language_model is not None:
        lm_type = model_type_of(language_model)
        lm_family = family_for_type(lm_type)
        if lm_family is None or not lm_family.causal_lm:
            decoders = sorted(t for f in causal_lm_families() for t in f.model_types)
            raise UnsupportedModelError(
                f"BLIP-2 with a {lm_type!r} language model is not supported yet; supported language models: "
                f"{', '.join(decoders)}.")
        for stage in lm_family.stages(language_model):
            stages.append(Stage("language", f"language_model.{stage.path}", run=call_model,
                                requires=("pixel_values", "input_ids"), mask_key="attention_mask",
                                mlp=stage.mlp, attention=stage.attention, config_attr="text_config"))
    return stages


def _image_token(model: nn.Module) -> int | None:
    """The id of the image placeholders in the text, where the Q-Former's outputs go (its name changed over
    transformers versions)."""
    token = getattr(model.config, "image_token_id", None)
    return getattr(model.config, "image_token_index", None) if token is None else token


def _caption_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return language_model_loss(model, batch, ignore_token=_image_token(model))


def _scores_with_captions(model: nn.Module, batch: dict, scorer: str) -> bool:
    if model.get_output_embeddings() is None or "input_ids" not in batch:
        raise CalibrationDataError(f"{scorer} scores BLIP-2 with its caption loss, which needs "
                                   "Blip2ForConditionalGeneration and batches with pixel_values and input_ids.")
    return True


CAPTION_LOSS = FamilyLoss(
    "caption_lm", "BLIP-2's caption loss: next-token cross-entropy on the text tokens (image placeholders and "
                  "padding ignored)",
    value=_caption_loss, select=_scores_with_captions, requires=("input_ids",), first=True)

FAMILY = register_family(Family("blip-2", ("blip-2",), resolve=_stages, loss=CAPTION_LOSS,
                                pipeline_tags={"Blip2ForConditionalGeneration": "image-to-text"}))
