"""Architecture knowledge in one place: one adapter per model family, found by ``config.model_type``.

An adapter lists the model's *stages*: each a ``ModuleList`` of transformer blocks plus how to drive a
forward pass that reaches the first block (``run``), which batch keys that pass needs, and which batch
key marks the real (non-padding) tokens of the stage's hidden states. Multi-tower models have several
stages walked one after another (CLIP: vision tower, text tower; BLIP-2: vision tower, Q-Former,
language model), so a later stage is calibrated on the outputs of the already pruned earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .errors import UnsupportedModelError


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _first_existing(model: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for path in candidates:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return path
    return None


def _call_model(model: nn.Module, batch: dict) -> Any:
    return model(**batch)


@dataclass(frozen=True)
class MLPSpec:
    """Where a block's MLP hidden neurons live, for structured removal.

    ``inputs``: Linears (relative to the block) whose output rows (and bias entries) are the neurons;
    ``output``: the Linear whose input columns consume them; ``width_key``: the config field holding
    their number, in the stage's (sub-)config.
    """

    inputs: tuple[str, ...]
    output: str
    width_key: str


@dataclass(frozen=True)
class AttentionSpec:
    """Where a block's self-attention lives, for structured removal of head dimensions and whole heads.

    ``q``/``k``/``v``/``o``: the projections (relative to the block); q-k dimensions pair rows of ``q`` with rows
    of ``k``, v-o dimensions pair rows of ``v`` with input columns of ``o``. ``module``: the attention module
    whose plain attributes its forward reads: ``head_dim_attr`` (the per-head width used to split q, k *and* v),
    ``heads_attr`` (the query-head count, when the forward reads one), ``total_attr`` (heads x width, when
    stored), ``scaling_attr`` (the softmax scale, computed once from the original head width).
    ``kv_heads_key``: config field of the key/value head count (grouped-query attention: a k or v dimension
    serves every query head of its group). ``head_dim_key``: config field a stock module reads its head width
    from (None: the width is always hidden_size / heads). ``rope``: rotary embeddings rotate dimension d with
    d + head_dim/2 (``rotate_half``), with frequencies computed from the config's head width, so q-k dimensions
    come in tied pairs and the head width itself cannot change.
    """

    q: str
    k: str
    v: str
    o: str
    module: str
    head_dim_attr: str = "head_dim"
    heads_attr: str | None = None
    total_attr: str | None = None
    scaling_attr: str | None = "scaling"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = None
    head_dim_key: str | None = None
    rope: bool = False


@dataclass
class Stage:
    """One sequence of blocks walked by the calibration engine."""

    name: str
    path: str  # dotted path of the nn.ModuleList holding the blocks
    run: Callable[[nn.Module, dict], Any] = _call_model
    requires: tuple[str, ...] = ("input_ids",)
    mask_key: str | None = "attention_mask"  # batch key whose [B, T] mask marks real tokens, or None
    mlp: MLPSpec | None = None  # the block's MLP neurons (structured methods)
    attention: AttentionSpec | None = None  # the block's self-attention (structured methods)
    config_attr: str = ""  # attribute of model.config holding this stage's sub-config ("" = model.config)

    def config(self, model: nn.Module) -> Any:
        """The (sub-)config describing this stage's blocks (a standalone tower uses its own root config)."""
        root = model.config
        for part in self.config_attr.split(".") if self.config_attr else ():
            if not hasattr(root, part):
                return model.config
            root = getattr(root, part)
        return root

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.path)

    def block_names(self, model: nn.Module) -> list[str]:
        return [f"{self.path}.{i}" for i in range(len(self.blocks(model)))]


@dataclass
class Adapter:
    """How to find and drive the blocks of one model family."""

    name: str
    model_types: tuple[str, ...]
    causal_lm: bool = False
    resolve: Callable[[nn.Module], list[Stage]] = field(default=lambda model: [])
    normalization: str = "layer"  # inside the blocks: "layer" (LayerNorm/RMSNorm + residual) or "batch" (BatchNorm)

    def stages(self, model: nn.Module) -> list[Stage]:
        stages = self.resolve(model)
        if not stages:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type={_model_type(model)!r}) belongs to the {self.name} family "
                f"but none of its block lists was found; hf_prune expects the stock transformers layout.")
        return stages


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def supported_families() -> dict[str, tuple[str, ...]]:
    families: dict[str, tuple[str, ...]] = {}
    for adapter in _ADAPTERS.values():
        families[adapter.name] = adapter.model_types
    return families


def get_adapter(model: nn.Module) -> Adapter:
    model_type = _model_type(model)
    if model_type in _ADAPTERS:
        return _ADAPTERS[model_type]
    known = "; ".join(f"{name} ({', '.join(types)})" for name, types in sorted(supported_families().items()))
    raise UnsupportedModelError(
        f"{type(model).__name__} (model_type={model_type!r}) is not a family the block walker knows. "
        f"Supported families (model_type values): {known}.")


# --------------------------------------------------------------------------------------------
# decoder-only language models


LLAMA_MLP = MLPSpec(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size")
OPT_MLP = MLPSpec(("fc1",), "fc2", "ffn_dim")
BERT_MLP = MLPSpec(("intermediate.dense",), "output.dense", "intermediate_size")
FC_MLP = MLPSpec(("mlp.fc1",), "mlp.fc2", "intermediate_size")  # ViT, CLIP and BLIP-2 vision towers
QFORMER_MLP = MLPSpec(("intermediate_query.dense",), "output_query.dense", "intermediate_size")

# LLaMA family: grouped-query attention with rotary embeddings; LlamaAttention reads only head_dim (head
# counts are inferred from the projection widths) and recomputes cos/sin from config.head_dim.
LLAMA_ATTENTION = AttentionSpec("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                module="self_attn", kv_heads_key="num_key_value_heads", head_dim_key="head_dim",
                                rope=True)
OPT_ATTENTION = AttentionSpec("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                              module="self_attn", heads_attr="num_heads")
BERT_ATTENTION = AttentionSpec("attention.self.query", "attention.self.key", "attention.self.value",
                               "attention.output.dense", module="attention.self", head_dim_attr="attention_head_size",
                               heads_attr="num_attention_heads", total_attr="all_head_size")
VIT_ATTENTION = AttentionSpec("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                              module="attention", heads_attr="num_attention_heads", head_dim_key="head_dim")
CLIP_ATTENTION = AttentionSpec("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                               module="self_attn", heads_attr="num_heads", scaling_attr="scale")
QFORMER_ATTENTION = AttentionSpec("attention.attention.query", "attention.attention.key", "attention.attention.value",
                                  "attention.output.dense", module="attention.attention",
                                  head_dim_attr="attention_head_size", heads_attr="num_attention_heads",
                                  total_attr="all_head_size")


def _decoder_stage(paths: tuple[str, ...], mlp: MLPSpec,
                   attention: AttentionSpec) -> Callable[[nn.Module], list[Stage]]:
    def resolve(model: nn.Module) -> list[Stage]:
        path = _first_existing(model, paths)
        return [Stage("decoder", path, mlp=mlp, attention=attention)] if path else []

    return resolve


LLAMA = register_adapter(Adapter(
    "llama", ("llama", "mistral", "qwen2", "qwen3"), causal_lm=True,
    resolve=_decoder_stage(("model.layers", "layers"), LLAMA_MLP, LLAMA_ATTENTION)))

OPT = register_adapter(Adapter(
    "opt", ("opt",), causal_lm=True,
    resolve=_decoder_stage(("model.decoder.layers", "decoder.layers"), OPT_MLP, OPT_ATTENTION)))


# --------------------------------------------------------------------------------------------
# encoders


def _bert(model: nn.Module) -> list[Stage]:
    path = _first_existing(model, ("bert.encoder.layer", "encoder.layer"))
    return [Stage("encoder", path, mlp=BERT_MLP, attention=BERT_ATTENTION)] if path else []


BERT = register_adapter(Adapter("bert", ("bert",), resolve=_bert))


def _vit(model: nn.Module) -> list[Stage]:
    path = _first_existing(model, ("vit.layers", "layers", "vit.encoder.layer", "encoder.layer"))
    if not path:
        return []
    old = path.endswith("encoder.layer")  # older ViT layout used BERT's names (attention slicing: new layout only)
    return [Stage("encoder", path, requires=("pixel_values",), mask_key=None, mlp=BERT_MLP if old else FC_MLP,
                  attention=None if old else VIT_ATTENTION)]


VIT = register_adapter(Adapter("vit", ("vit",), resolve=_vit))


# --------------------------------------------------------------------------------------------
# CLIP: two independent towers


def _run_clip_vision(model: nn.Module, batch: dict) -> Any:
    return model.vision_model(pixel_values=batch["pixel_values"])


def _run_clip_text(model: nn.Module, batch: dict) -> Any:
    return model.text_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))


def _run_tower_vision(model: nn.Module, batch: dict) -> Any:
    return model(pixel_values=batch["pixel_values"])


def _run_tower_text(model: nn.Module, batch: dict) -> Any:
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))


def _clip(model: nn.Module) -> list[Stage]:
    stages = []
    if _first_existing(model, ("vision_model.encoder.layers",)):
        stages.append(Stage("vision", "vision_model.encoder.layers", run=_run_clip_vision,
                            requires=("pixel_values",), mask_key=None, mlp=FC_MLP, attention=CLIP_ATTENTION,
                            config_attr="vision_config"))
    if _first_existing(model, ("text_model.encoder.layers",)):
        stages.append(Stage("text", "text_model.encoder.layers", run=_run_clip_text, mlp=FC_MLP,
                            attention=CLIP_ATTENTION, config_attr="text_config"))
    if not stages and _first_existing(model, ("encoder.layers",)):  # a standalone tower (transformers 5 layout)
        if _model_type(model) == "clip_vision_model":
            stages.append(Stage("vision", "encoder.layers", run=_run_tower_vision, requires=("pixel_values",),
                                mask_key=None, mlp=FC_MLP, attention=CLIP_ATTENTION))
        elif _model_type(model) == "clip_text_model":
            stages.append(Stage("text", "encoder.layers", run=_run_tower_text, mlp=FC_MLP, attention=CLIP_ATTENTION))
    return stages


CLIP = register_adapter(Adapter("clip", ("clip", "clip_vision_model", "clip_text_model"), resolve=_clip))


# --------------------------------------------------------------------------------------------
# BLIP-2: vision tower -> Q-Former -> language model


def _run_blip2_vision(model: nn.Module, batch: dict) -> Any:
    return model.vision_model(pixel_values=batch["pixel_values"])


def _run_blip2_qformer(model: nn.Module, batch: dict) -> Any:
    return model.get_image_features(pixel_values=batch["pixel_values"])


def _blip2(model: nn.Module) -> list[Stage]:
    stages = []
    if _first_existing(model, ("vision_model.encoder.layers",)):  # fused qkv Linear: no attention slicing
        stages.append(Stage("vision", "vision_model.encoder.layers", run=_run_blip2_vision,
                            requires=("pixel_values",), mask_key=None, mlp=FC_MLP, config_attr="vision_config"))
    if _first_existing(model, ("qformer.encoder.layer",)):  # self-attention only (cross-attention untouched)
        stages.append(Stage("qformer", "qformer.encoder.layer", run=_run_blip2_qformer,
                            requires=("pixel_values",), mask_key=None, mlp=QFORMER_MLP,
                            attention=QFORMER_ATTENTION, config_attr="qformer_config"))
    language_model = getattr(model, "language_model", None)
    if language_model is not None:
        lm_type = _model_type(language_model)
        lm_adapter = _ADAPTERS.get(lm_type)
        if lm_adapter is None or not lm_adapter.causal_lm:
            decoders = sorted(t for a in _ADAPTERS.values() if a.causal_lm for t in a.model_types)
            raise UnsupportedModelError(
                f"BLIP-2 with a {lm_type!r} language model is not supported yet; supported language models: "
                f"{', '.join(decoders)}.")
        for stage in lm_adapter.stages(language_model):
            stages.append(Stage("language", f"language_model.{stage.path}", run=_call_model,
                                requires=("pixel_values", "input_ids"), mask_key="attention_mask",
                                mlp=stage.mlp, attention=stage.attention, config_attr="text_config"))
    return stages


BLIP2 = register_adapter(Adapter("blip-2", ("blip-2",), resolve=_blip2))


# --------------------------------------------------------------------------------------------
# convolutional nets (no transformer MLP; their blocks' Conv2d layers are the components, e.g. for unlearning)


def _resnet(model: nn.Module) -> list[Stage]:
    path = _first_existing(model, ("resnet.encoder.stages", "encoder.stages"))
    return [Stage("encoder", path, requires=("pixel_values",), mask_key=None)] if path else []


RESNET = register_adapter(Adapter("resnet", ("resnet",), resolve=_resnet, normalization="batch"))


# ---------------------------------------------------------------------------------------------
# where images enter a vision tower (input-space methods such as input compensation)


@dataclass(frozen=True)
class PixelInput:
    """Where ``pixel_values`` enter a model's vision tower.

    ``embedding``: the patch-embedding convolution that first reads the pixels; ``consumer``: the deepest
    module (the embedding itself or one of its ancestors) whose ``forward`` takes ``pixel_values``, so a
    pre-hook there changes the pixels for every caller (``forward``, ``get_image_features``, pipelines);
    ``shape``: the ``(channels, height, width)`` the tower is configured for.
    """

    embedding: str
    consumer: str
    shape: tuple[int, int, int]


def _takes_pixel_values(module: nn.Module) -> bool:
    import inspect

    try:
        return "pixel_values" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def pixel_input(model: nn.Module) -> PixelInput:
    """The pixel entry point of a supported vision model (ViT, CLIP, BLIP-2 vision towers)."""
    stages = [s for s in get_adapter(model).stages(model) if "pixel_values" in s.requires]
    if not stages:
        raise UnsupportedModelError(f"{type(model).__name__} has no vision tower reading pixel_values.")
    config = stages[0].config(model)
    channels = int(getattr(config, "num_channels", 3))
    size = getattr(config, "image_size", None)
    if size is None:
        raise UnsupportedModelError(f"{type(model).__name__}'s vision config has no image_size.")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == channels:
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                path = ".".join(parts[:cut])
                if _takes_pixel_values(model.get_submodule(path)):
                    return PixelInput(name, path, (channels, int(height), int(width)))
            break
    raise UnsupportedModelError(f"no patch-embedding convolution reading pixel_values found in {type(model).__name__}.")
