"""Generic block discovery: the stages of any ``PreTrainedModel`` from what transformers declares about it.

A model's *blocks* are the children of a ``ModuleList`` whose class is one of the ``_no_split_modules`` that the
model (or any pretrained sub-model inside it) declares: the units accelerate never splits across devices, which
transformers keeps equal to its decoder/encoder layers. Lists nested inside another list's blocks are left to
the outer one. A model that declares none (DistilBERT) falls back to lists of one repeated class holding
linear-like layers. Each list found is one ``Stage``; the forward pass that reaches it is the model's own.

What discovery cannot know stays in a family file (``models/<family>.py``): multi-tower run functions, structured
specs (RoPE pairs, head-width attributes), scoring losses, pipeline tags. A family file that only adds specs
uses ``discovered(...)`` as its resolver. ``base_model_tp_plan`` (which Linears tensor parallelism splits by
columns and which by rows) gives the MLP neuron spec of a plain gate/up/down or fc1/fc2 MLP when no family
file does.

Discovery is checked at run time: the walker replays the first blocks on the inputs it captured and compares
them with the real forward (``engine.walker.verify_replay``) before any weight changes.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import UnsupportedModelError
from .layers import in_features, is_linear_like, out_features
from .losses import seq2seq_loss
from .spec import (
    AttentionSpec,
    Family,
    FamilyLoss,
    MLPSpec,
    Stage,
    call_model,
    family_for_type,
    is_causal_lm,
    model_type_of,
    patch_tokens,
    sequence_tokens,
    supported_families,
)

MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "hidden_dim", "encoder_ffn_dim")


def block_classes(model: nn.Module) -> list[str]:
    """Class names of the blocks the model declares (``_no_split_modules`` of it and of every pretrained
    sub-model inside it), in the order found."""
    names: list[str] = []
    for module in model.modules():
        for name in getattr(type(module), "_no_split_modules", None) or ():
            if name not in names:
                names.append(name)
    return names


def has_weights(block: nn.Module) -> bool:
    """Whether a block holds something a pruner prunes: a linear-like layer or fused 3-D expert weights."""
    return any(is_linear_like(m) for m in block.modules()) or any(
        p.dim() == 3 for p in block.parameters(recurse=True))


def _outermost(found: list[tuple[str, nn.ModuleList]]) -> list[tuple[str, nn.ModuleList]]:
    paths = [p for p, _ in found]
    return [(p, m) for p, m in found if not any(p.startswith(o + ".") for o in paths if o != p)]


def block_lists(model: nn.Module) -> tuple[list[tuple[str, nn.ModuleList]], str]:
    """``([(path, ModuleList)], how they were found)``: the outermost lists of declared blocks holding weights,
    in module order; empty when there are none."""
    declared = block_classes(model)
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    found = [(p, m) for p, m in lists if all(type(b).__name__ in declared for b in m)]
    found = [(p, m) for p, m in _outermost(found) if any(has_weights(b) for b in m)]
    if found:
        classes = sorted({type(b).__name__ for _, m in found for b in m})
        return found, f"generic discovery: ModuleLists of {', '.join(classes)} (declared in _no_split_modules)"
    same = [(p, m) for p, m in lists if len({type(b) for b in m}) == 1 and all(has_weights(b) for b in m)]
    same = _outermost(same)
    if same:
        classes = sorted({type(m[0]).__name__ for _, m in same})
        why = "no _no_split_modules declared" if not declared else f"none of {declared} sits in a ModuleList"
        return same, f"generic discovery: ModuleLists of one repeated class {', '.join(classes)} ({why})"
    return [], ""


def _causal_type(model: nn.Module) -> bool:
    """A decoder-only language model by its class or by its model_type (a base model without its LM head)."""
    if is_causal_lm(model):
        return True
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover - transformers always ships them
        return False
    model_type = model_type_of(model)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _owner(model: nn.Module, path: str) -> nn.Module:
    """The innermost pretrained (sub-)model holding ``path`` (the model itself when none is nested)."""
    owner, parts = model, path.split(".")
    for cut in range(1, len(parts)):
        sub = model.get_submodule(".".join(parts[:cut]))
        if hasattr(sub, "main_input_name") and hasattr(sub, "config"):
            owner = sub
    return owner


def _stage_name(path: str, single: bool, causal: bool) -> str:
    if single:
        return "decoder" if causal else "encoder"
    parts = [p for p in path.split(".") if p not in ("model", "layers", "layer", "block", "blocks", "h")]
    if len(parts) > 1 and parts[-1] in ("encoder", "decoder"):  # vision_model.encoder -> vision_model
        parts = parts[:-1]
    return ".".join(parts) or path


def _tp_plan(model: nn.Module) -> dict[str, str]:
    plan: dict[str, str] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        for key, value in (getattr(config, "base_model_tp_plan", None) or {}).items():
            plan.setdefault(key, value)
    return plan


def tp_mlp(model: nn.Module, path: str, blocks: nn.ModuleList, config: Any) -> MLPSpec | None:
    """The MLP neuron spec that ``base_model_tp_plan`` implies for the blocks at ``path``: one module whose
    plain ``colwise`` Linears feed one plain ``rowwise`` Linear, the same in every block, with a config field
    holding their width. None when the plan says nothing or anything is unusual (fused, packed, experts)."""
    leaf = path.rsplit(".", 1)[-1]
    groups: dict[str, dict[str, list[str]]] = {}
    for key, style in _tp_plan(model).items():
        head, star, rel = key.partition(".*.")
        if not star or head.rsplit(".", 1)[-1] != leaf or "experts" in rel or "." not in rel:
            continue
        parent = rel.rsplit(".", 1)[0]
        groups.setdefault(parent, {}).setdefault(style, []).append(rel)
    for parent, styles in groups.items():
        if not ("attn" not in parent and "attention" not in parent and styles.get("colwise")
                and len(styles.get("rowwise", ())) == 1 and set(styles) <= {"colwise", "rowwise"}):
            continue
        inputs, output = tuple(styles["colwise"]), styles["rowwise"][0]
        try:
            layers = [[b.get_submodule(n) for n in (*inputs, output)] for b in blocks]
        except AttributeError:
            return None
        if not all(isinstance(m, nn.Linear) for row in layers for m in row):
            return None
        width = in_features(layers[0][-1])
        if any(out_features(m) != width for m in layers[0][:-1]):
            return None
        key = next((k for k in MLP_WIDTH_KEYS if getattr(config, k, None) == width), None)
        return MLPSpec(inputs, output, key) if key else None
    return None


def decoder_inputs(model: nn.Module, batch: dict) -> dict:
    """An encoder-decoder's batch with decoder inputs: given ones are kept; otherwise the decoder reads the batch's
    ``labels`` or, failing those, its ``input_ids`` shifted right behind the decoder start token (the model's own
    ``prepare_decoder_input_ids_from_labels`` where it has one), so plain text calibrates both stacks."""
    if any(k in batch for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels")) or "input_ids" not in batch:
        return batch
    ids = batch["input_ids"]
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        try:
            return {**batch, "decoder_input_ids": prepare(labels=ids)}
        except (TypeError, ValueError, AttributeError):  # a model whose helper needs more than labels
            pass
    config = getattr(model, "config", None)
    start = getattr(config, "decoder_start_token_id", None)
    start = getattr(config, "bos_token_id", 0) if start is None else start
    shifted = ids.new_full(ids.shape, int(start or 0))
    shifted[:, 1:] = ids[:, :-1]
    return {**batch, "decoder_input_ids": shifted}


def run_encoder_decoder(model: nn.Module, batch: dict) -> Any:
    """The forward pass of an encoder-decoder on ``batch`` (``decoder_inputs`` fills in the decoder's)."""
    return model(**decoder_inputs(model, batch))


def discover_stages(model: nn.Module, *, mlp: MLPSpec | None = None, attention: AttentionSpec | None = None,
                    name: str | None = None, causal: bool | None = None) -> list[Stage]:
    """The model's stages by generic discovery (empty when no block list is found). ``mlp``/``attention``: the
    family's specs of its blocks (default: the MLP spec ``base_model_tp_plan`` implies, no attention spec);
    ``name``: the name of a single stage (default ``decoder`` for a causal LM, else ``encoder``)."""
    lists, origin = block_lists(model)
    if causal is None and not (name and len(lists) == 1):  # only a stage's default name needs it
        causal = _causal_type(model)
    root_input = getattr(model, "main_input_name", "input_ids")
    stages = []
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    for path, blocks in lists:
        owner = _owner(model, path)
        own_input = getattr(owner, "main_input_name", root_input)  # what the stage's own tower reads
        if owner is not model and "vision" in type(owner).__name__.lower():  # Qwen2-VL's tower keeps the default
            own_input = "pixel_values"
        inputs = tuple(dict.fromkeys((root_input, own_input)))
        mask_key = "attention_mask" if own_input == "input_ids" else None  # a vision tower's tokens are patches
        if encoder_decoder:  # both stacks run from the model's own input; the decoder's may be derived from it
            inputs = (root_input,)
            decoder = owner is not model and owner is getattr(model, "get_decoder", lambda: None)()
            mask_key = ("attention_mask" if root_input == "input_ids" else
                        "decoder_attention_mask" if decoder else None)
        config_attr = ""
        if owner is not model:  # the sub-config of a nested pretrained model
            config_attr = next((k for k, v in vars(model.config).items() if v is owner.config), "")
        image = own_input == "pixel_values"
        stage_name = (name if name and len(lists) == 1 else _stage_name(path, len(lists) == 1, causal))
        run = run_encoder_decoder if encoder_decoder else call_model
        stage = Stage(stage_name, path, run=run, requires=inputs, mask_key=mask_key,
                      config_attr=config_attr, tokens=patch_tokens if image else sequence_tokens,
                      origin=f"{origin}; {len(blocks)} at {path}")
        stage.mlp = mlp if mlp is not None else tp_mlp(model, path, blocks, stage.config(model))
        stage.attention = attention
        stages.append(stage)
    return stages


def discovered(mlp: MLPSpec | None = None, attention: AttentionSpec | None = None,
               name: str | None = None) -> Callable[[nn.Module], list[Stage]]:
    """A family file's resolver: generic discovery, with the family's own specs and stage name."""
    def resolve(model: nn.Module) -> list[Stage]:
        return discover_stages(model, mlp=mlp, attention=attention, name=name)

    return resolve


def _scores_seq2seq(model: nn.Module, batch: dict, scorer: str) -> bool:
    """Text encoder-decoders with their LM head; others (Whisper's audio batches) take the generic losses."""
    return model.get_output_embeddings() is not None and ("input_ids" in batch or "labels" in batch)


SEQ2SEQ_LOSS = FamilyLoss("seq2seq_lm", "an encoder-decoder's loss: the decoder predicts the labels, or the input "
                                        "text itself, from the encoder's reading of it (padding ignored)",
                          value=seq2seq_loss, select=_scores_seq2seq, first=True)


def generic_family(model: nn.Module) -> Family:
    """The family of a model no family file covers, found by generic discovery; an ``UnsupportedModelError``
    saying what was looked for when nothing is found."""
    model_type = model_type_of(model)
    lists, _ = block_lists(model)
    if not lists:
        declared = block_classes(model)
        looked = (f"it declares _no_split_modules {declared}, but no ModuleList of them holding Linear layers was "
                  "found" if declared else "it declares no _no_split_modules and holds no ModuleList of one "
                  "repeated block class with Linear layers")
        known = "; ".join(f"{n} ({', '.join(t)})" for n, t in sorted(supported_families().items()))
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not a family hf_prune has a file for, and "
            f"generic block discovery found no blocks: {looked}. Register a family for it "
            f"(hf_prune.models.register_family) that names its block lists. Families with a file (model_type "
            f"values): {known}.")
    causal = _causal_type(model)
    loss = SEQ2SEQ_LOSS if getattr(model.config, "is_encoder_decoder", False) else None
    return Family(str(model_type or type(model).__name__), (str(model_type),), causal_lm=is_causal_lm(model),
                  resolve=lambda m: discover_stages(m, causal=causal), generic=True, loss=loss)


def get_family(model: nn.Module) -> Family:
    """The registered family of ``model``'s model_type, or else the one generic discovery finds."""
    family = family_for_type(model_type_of(model))
    if family is not None:
        return family
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers model (it has no config); hf_prune prunes "
            "PreTrainedModel instances.")
    return generic_family(model)


# transformers' Auto mappings -> the Hub pipeline tag of the classes they map to (the first match wins)
AUTO_PIPELINES = (
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "automatic-speech-recognition"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "image-text-to-text"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "text2text-generation"),
    ("MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES", "zero-shot-image-classification"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
    ("MODEL_MAPPING_NAMES", "feature-extraction"),
)


def auto_pipeline_tag(model_class: str) -> str | None:
    """The pipeline tag transformers' Auto mappings imply for a model class (``GPT2LMHeadModel`` ->
    text-generation), for a model no family file covers; None when no mapping names the class."""
    from transformers.models.auto import modeling_auto

    for constant, tag in AUTO_PIPELINES:
        for value in getattr(modeling_auto, constant, {}).values():
            if model_class == value or (isinstance(value, (list, tuple)) and model_class in value):
                return tag
    return None


def text_context(model: nn.Module, stages: list[Stage] | None = None) -> int | None:
    """The most tokens one sequence of ``input_ids`` may hold in ``model``: the shortest context of ``stages``
    (default: all of the family's stages) that read ``input_ids``; None when none does, or the family is unknown
    (the run itself then says so)."""
    if stages is None:
        try:
            stages = get_family(model).stages(model)
        except UnsupportedModelError:
            return None
    contexts = [c for c in (stage.context(model) for stage in stages) if c is not None]
    return min(contexts) if contexts else None
