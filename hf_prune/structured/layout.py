"""Saving structurally pruned models whose shapes a stock config cannot describe.

A stock transformers config holds one ``intermediate_size`` / ``head_dim`` / head count per stage. When
structured pruning leaves blocks of different widths, ``save_variable_layout`` writes, next to the usual
``config.json`` and safetensors:

- ``config.json`` with ``model_type = "hf_prune_<type>"``, an ``hf_prune_layout`` entry (the shape of every
  Linear that differs from what the stock config builds, and every changed plain attribute of a module,
  such as a per-layer head count), and an ``auto_map``;
- ``hf_prune_layout.py``: a small self-contained module (it imports only torch and transformers) that subclasses
  the original config and model classes and rebuilds those layers after the normal constructor.

So ``AutoModel...from_pretrained(folder, trust_remote_code=True)`` - stock transformers, no hf_prune - reloads the
smaller model with identical outputs. What changed is found by comparing the model with a meta-device instance
of its own config, so structured methods need not declare anything.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

LAYOUT_FILE = "hf_prune_layout.py"
_PRIMITIVES = (bool, int, float, str)

_AUTO_CLASSES = {  # transformers' name-mapping constant -> the Auto class that uses it
    "MODEL_MAPPING_NAMES": "AutoModel",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "AutoModelForCausalLM",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "AutoModelForMaskedLM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "AutoModelForSequenceClassification",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "AutoModelForTokenClassification",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "AutoModelForImageClassification",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "AutoModelForImageTextToText",
    "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES": "AutoModelForVision2Seq",
    "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES": "AutoModelForZeroShotImageClassification",
}

_TEMPLATE = '''"""Written by hf_prune: {model_class} with per-layer shapes (structured pruning).

Self-contained (torch + transformers only). Load with
    transformers.AutoModel....from_pretrained(folder, trust_remote_code=True)
"""

from torch import nn
from transformers import {config_class}, {model_class}


class HFPrune{config_class}({config_class}):
    model_type = "{model_type}"

    def __init__(self, hf_prune_layout=None, **kwargs):
        self.hf_prune_layout = hf_prune_layout or {{"linears": {{}}, "attributes": {{}}}}
        super().__init__(**kwargs)


def apply_hf_prune_layout(model, layout):
    """Rebuild the Linear layers and module attributes that structured pruning changed."""
    for name, (out_features, in_features, bias) in layout.get("linears", {{}}).items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, child)
        setattr(owner, child, nn.Linear(in_features, out_features, bias=bias, device=old.weight.device,
                                        dtype=old.weight.dtype))
    for name, attributes in layout.get("attributes", {{}}).items():
        module = model.get_submodule(name) if name else model
        for key, value in attributes.items():
            setattr(module, key, value)


class HFPrune{model_class}({model_class}):
    config_class = HFPrune{config_class}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_hf_prune_layout(self, config.hf_prune_layout)
'''


def _reference(model: nn.Module) -> nn.Module:
    """The model its own config would build, on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return type(model)(model.config)


def layout_of(model: nn.Module) -> dict:
    """Linear shapes and numeric module attributes (widths, head counts) that differ from what ``model.config``
    builds. Strings (e.g. a ``name_or_path`` a user set on the model) are not part of the layout, nor attributes of
    modules none of whose Linears was resized."""
    reference = dict(_reference(model).named_modules())
    linears, attributes = {}, {}
    for name, module in model.named_modules():
        ref = reference.get(name)
        if ref is None:
            continue
        if isinstance(module, nn.Linear):
            if (module.out_features, module.in_features) != (ref.out_features, ref.in_features):
                linears[name] = [module.out_features, module.in_features, module.bias is not None]
            continue
        changed = {k: v for k, v in vars(module).items()
                   if not k.startswith("_") and k != "training" and isinstance(v, _PRIMITIVES) and not isinstance(v, str)
                   and k in vars(ref) and vars(ref)[k] != v}
        if changed:
            attributes[name] = changed
    # an attribute counts only on a module holding a resized Linear: slicing changes both, whereas some forwards
    # set plain attributes themselves (Swin's layers fit their window and shift to the input resolution)
    attributes = {name: changed for name, changed in attributes.items()
                  if any(not name or linear.startswith(f"{name}.") for linear in linears)}
    return {"linears": linears, "attributes": attributes}


def needs_variable_layout(model: nn.Module) -> bool:
    layout = layout_of(model)
    return bool(layout["linears"] or layout["attributes"])


def auto_classes(model_type: str, class_name: str) -> list[str]:
    """The transformers Auto classes (``AutoModelForCausalLM``, ...) whose mapping takes ``model_type`` to
    ``class_name``, or ``["AutoModel"]`` when none does: a variable-layout folder's ``auto_map`` names them all,
    and its model card loads it through the first."""
    from transformers.models.auto import modeling_auto

    found = []
    for constant, auto_name in _AUTO_CLASSES.items():
        mapping = getattr(modeling_auto, constant, {})
        value = mapping.get(model_type)
        if value == class_name or (isinstance(value, (list, tuple)) and class_name in value):
            found.append(auto_name)
    return found or ["AutoModel"]


def save_variable_layout(model: nn.Module, folder: str) -> dict:
    """After ``model.save_pretrained(folder)``: make ``folder`` reload through ``trust_remote_code``.

    Returns the layout written. Raises ``ValueError`` for a model whose config class transformers does not export.
    """
    import transformers

    layout = layout_of(model)
    model_class = type(model).__name__
    config_class = type(model.config).__name__
    if getattr(transformers, model_class, None) is not type(model) or not hasattr(transformers, config_class):
        raise ValueError(f"{model_class} is not a stock transformers class; cannot write a per-layer layout for it.")
    original_type = model.config.model_type
    new_type = f"hf_prune_{original_type.replace('-', '_')}"
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["model_type"] = new_type
    config["hf_prune_layout"] = layout
    config["hf_prune_original_model_type"] = original_type
    config["architectures"] = [f"HFPrune{model_class}"]
    auto_map = {"AutoConfig": f"hf_prune_layout.HFPrune{config_class}"}
    for auto in auto_classes(original_type, model_class):
        auto_map[auto] = f"hf_prune_layout.HFPrune{model_class}"
    config["auto_map"] = auto_map
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")
    with open(os.path.join(folder, LAYOUT_FILE), "w", encoding="utf-8") as fh:
        fh.write(_TEMPLATE.format(model_class=model_class, config_class=config_class, model_type=new_type))
    return layout
