"""What the engine needs to know about a model family: its stages of blocks and the specs of their MLP and
attention, and the registry of families (one small file per family in ``hf_prune.models``).

A family lists the model's *stages*: each a ``ModuleList`` of transformer blocks plus how to drive a
forward pass that reaches the first block (``run``), which batch keys that pass needs, and which batch
key marks the real (non-padding) tokens of the stage's hidden states. Multi-tower models have several
stages walked one after another (CLIP: vision tower, text tower; BLIP-2: vision tower, Q-Former,
language model), so a later stage is calibrated on the outputs of the already pruned earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import UnsupportedModelError


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def first_existing(model: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for path in candidates:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return path
    return None


def call_model(model: nn.Module, batch: dict) -> Any:
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


TokenCount = Callable[[Any, Any, int], int]
"""``(model config, stage config, seq_len) -> tokens`` one sample puts through each block of a stage."""


def sequence_tokens(config: Any, stage_config: Any, seq_len: int) -> int:
    """A text stage: the calibration sequence itself."""
    return seq_len


def patch_tokens(config: Any, stage_config: Any, seq_len: int) -> int:
    """A vision tower: one token per image patch plus the class token (ViT's 224 / 16 when the config is silent)."""
    image = getattr(stage_config, "image_size", 224)
    patch = getattr(stage_config, "patch_size", 16)
    return (image // patch) ** 2 + 1


@dataclass
class Stage:
    """One sequence of blocks walked by the calibration engine."""

    name: str
    path: str  # dotted path of the nn.ModuleList holding the blocks
    run: Callable[[nn.Module, dict], Any] = call_model
    requires: tuple[str, ...] = ("input_ids",)
    mask_key: str | None = "attention_mask"  # batch key whose [B, T] mask marks real tokens, or None
    mlp: MLPSpec | None = None  # the block's MLP neurons (structured methods)
    attention: AttentionSpec | None = None  # the block's self-attention (structured methods)
    config_attr: str = ""  # attribute of model.config holding this stage's sub-config ("" = model.config)
    tokens: TokenCount = sequence_tokens  # tokens per sample through each block (the planner's memory and time)
    context_key: str = "max_position_embeddings"  # field of the stage's config: the most tokens a sequence may hold
    origin: str = ""  # how the stage was found (generic discovery says what it read), for error messages

    def context(self, model: nn.Module) -> int | None:
        """The most tokens of ``input_ids`` one sequence may hold for this stage (its config's ``context_key``);
        None for a stage that reads no ``input_ids`` (a vision tower) or whose config sets no limit."""
        if "input_ids" not in self.requires:
            return None
        value = getattr(self.config(model), self.context_key, None)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def tokens_per_sample(self, model: nn.Module, seq_len: int) -> int:
        """Tokens one sample puts through each block of this stage, for calibration sequences of ``seq_len``."""
        return self.tokens(model.config, self.config(model), seq_len)

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


@dataclass(frozen=True)
class FamilyLoss:
    """The family's own loss, for methods that score weights with a loss (ECoFLaP), where the generic ones (a
    causal LM's next-token loss, the model's own loss on ``labels``, label-free output sensitivity) would miss
    what the family is trained on.

    ``kind``: its name in reports; ``description``: one line saying what it is; ``value(model, batch)``: the
    float64 loss of one batch; ``select(model, batch, scorer)``: whether a model of the family is scored with it
    on batches like ``batch``, raising a ``CalibrationDataError`` that names the fix when it should be but this
    model or batch cannot carry it (``scorer``: the scoring method's display name, for that message);
    ``check(batches)``: raises the same way when one of the scoring batches does not suit it; ``requires``: batch
    keys every scoring batch must carry; ``first``: True when it goes before the generic losses (even on batches
    with ``labels``), False when it only replaces the label-free fallback.
    """

    kind: str
    description: str
    value: Callable[[nn.Module, dict], torch.Tensor]
    select: Callable[[nn.Module, dict, str], bool]
    check: Callable[[list[dict]], None] = lambda batches: None
    requires: tuple[str, ...] = ()
    first: bool = False


@dataclass
class Family:
    """How to find and drive the blocks of one model family.

    ``resolve``: the model's stages (``hf_prune.models.discovery.discovered`` finds them generically);
    ``causal_lm``: a decoder-only language-model family (next-token calibration text, packed windows);
    ``loss``: the family's own scoring loss, if the generic ones do not fit it; ``pipeline_tags``: Hub pipeline
    tags of the family's classes that the generic class-name suffixes (``...ForCausalLM``, ``...Model``) would get
    wrong, by class-name suffix.
    """

    name: str
    model_types: tuple[str, ...]
    causal_lm: bool = False
    resolve: Callable[[nn.Module], list[Stage]] = field(default=lambda model: [])
    normalization: str = "layer"  # inside the blocks: "layer" (LayerNorm/RMSNorm + residual) or "batch" (BatchNorm)
    loss: FamilyLoss | None = None
    pipeline_tags: Mapping[str, str] = field(default_factory=dict)
    generic: bool = False  # made by generic discovery for a model_type no family file covers

    def stages(self, model: nn.Module) -> list[Stage]:
        stages = self.resolve(model)
        if not stages:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type={model_type_of(model)!r}) belongs to the {self.name} family "
                f"but none of its block lists was found; hf_prune expects the stock transformers layout.")
        return stages


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def supported_families() -> dict[str, tuple[str, ...]]:
    families: dict[str, tuple[str, ...]] = {}
    for family in _FAMILIES.values():
        families[family.name] = family.model_types
    return families


def registered_families() -> list[Family]:
    """Every registered family, once each."""
    return list({id(f): f for f in _FAMILIES.values()}.values())


def causal_lm_families() -> list[Family]:
    return [f for f in registered_families() if f.causal_lm]


def family_for_type(model_type: str | None) -> Family | None:
    return _FAMILIES.get(model_type)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal LM by its class or config: a ``...CausalLM`` class or architecture, or a
    config marked ``is_decoder`` (an encoder-decoder never is). It reads the instance, not the family, because
    one family holds both kinds (a BERT configured as a decoder; a LLaMA backbone without its LM head); for the
    stock model classes it agrees with ``Family.causal_lm`` (tests/test_models.py)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    names = [type(model).__name__, *(getattr(config, "architectures", None) or [])]
    return any("CausalLM" in n for n in names) or bool(getattr(config, "is_decoder", False))


# shared by several families: the fc1/fc2 MLP of ViT, CLIP and BLIP-2's vision tower
FC_MLP = MLPSpec(("mlp.fc1",), "mlp.fc2", "intermediate_size")
