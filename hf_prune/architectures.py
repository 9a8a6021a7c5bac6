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


@dataclass
class Stage:
    """One sequence of blocks walked by the calibration engine."""

    name: str
    path: str  # dotted path of the nn.ModuleList holding the blocks
    run: Callable[[nn.Module, dict], Any] = _call_model
    requires: tuple[str, ...] = ("input_ids",)
    mask_key: str | None = "attention_mask"  # batch key whose [B, T] mask marks real tokens, or None
    mlp: MLPSpec | None = None  # the block's MLP neurons (structured methods)
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


def _decoder_stage(paths: tuple[str, ...], mlp: MLPSpec) -> Callable[[nn.Module], list[Stage]]:
    def resolve(model: nn.Module) -> list[Stage]:
        path = _first_existing(model, paths)
        return [Stage("decoder", path, mlp=mlp)] if path else []

    return resolve


LLAMA = register_adapter(Adapter(
    "llama", ("llama", "mistral", "qwen2", "qwen3"), causal_lm=True,
    resolve=_decoder_stage(("model.layers", "layers"), LLAMA_MLP)))

OPT = register_adapter(Adapter(
    "opt", ("opt",), causal_lm=True,
    resolve=_decoder_stage(("model.decoder.layers", "decoder.layers"), OPT_MLP)))


# --------------------------------------------------------------------------------------------
# encoders


def _bert(model: nn.Module) -> list[Stage]:
    path = _first_existing(model, ("bert.encoder.layer", "encoder.layer"))
    return [Stage("encoder", path, mlp=BERT_MLP)] if path else []


BERT = register_adapter(Adapter("bert", ("bert",), resolve=_bert))


def _vit(model: nn.Module) -> list[Stage]:
    path = _first_existing(model, ("vit.layers", "layers", "vit.encoder.layer", "encoder.layer"))
    if not path:
        return []
    mlp = BERT_MLP if path.endswith("encoder.layer") else FC_MLP  # older ViT layout used BERT's names
    return [Stage("encoder", path, requires=("pixel_values",), mask_key=None, mlp=mlp)]


VIT = register_adapter(Adapter("vit", ("vit",), resolve=_vit))


# --------------------------------------------------------------------------------------------
# CLIP: two independent towers


def _run_clip_vision(model: nn.Module, batch: dict) -> Any:
    return model.vision_model(pixel_values=batch["pixel_values"])


def _run_clip_text(model: nn.Module, batch: dict) -> Any:
    return model.text_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))


def _clip(model: nn.Module) -> list[Stage]:
    stages = []
    if _first_existing(model, ("vision_model.encoder.layers",)):
        stages.append(Stage("vision", "vision_model.encoder.layers", run=_run_clip_vision,
                            requires=("pixel_values",), mask_key=None, mlp=FC_MLP, config_attr="vision_config"))
    if _first_existing(model, ("text_model.encoder.layers",)):
        stages.append(Stage("text", "text_model.encoder.layers", run=_run_clip_text, mlp=FC_MLP,
                            config_attr="text_config"))
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
    if _first_existing(model, ("vision_model.encoder.layers",)):
        stages.append(Stage("vision", "vision_model.encoder.layers", run=_run_blip2_vision,
                            requires=("pixel_values",), mask_key=None, mlp=FC_MLP, config_attr="vision_config"))
    if _first_existing(model, ("qformer.encoder.layer",)):
        stages.append(Stage("qformer", "qformer.encoder.layer", run=_run_blip2_qformer,
                            requires=("pixel_values",), mask_key=None, mlp=QFORMER_MLP,
                            config_attr="qformer_config"))
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
                                mlp=stage.mlp, config_attr="text_config"))
    return stages


BLIP2 = register_adapter(Adapter("blip-2", ("blip-2",), resolve=_blip2))


# --------------------------------------------------------------------------------------------
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
