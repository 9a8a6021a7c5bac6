"""Recovery after pruning with PEFT LoRA: merge the adapters into the pruned base without losing its sparsity.

PEFT's ``merge_and_unload()`` adds the dense LoRA update ``B @ A * scale`` to every adapted weight, which fills
every pruned position. ``merge_lora_keep_sparsity`` merges and then re-applies the pruning masks, so the merged
model has exactly the zeros (and the N:M groups) of the pruned one. What that costs: the part of each LoRA
update that fell on pruned positions is thrown away, so the merged model is not exactly the adapter model.
The function measures that part (the fraction of the update's squared norm dropped, per module and overall);
keep the adapter unmerged when that matters, or fine-tune the merged model briefly with
``hf_prune.callbacks.SparsityPreservingCallback`` to win it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .weight_masks import WeightMasks


@dataclass
class LoraMerge:
    """The merged model and what re-masking dropped from the LoRA updates."""

    model: nn.Module = field(repr=False)
    masked_modules: int
    dropped_fraction: float  # of the LoRA updates' total squared norm, over all merged modules
    per_module: dict[str, float]  # module name -> fraction of its update's squared norm dropped

    def to_dict(self) -> dict:
        return {"lora_merge": "merge_and_unload, then the pruning masks re-applied",
                "lora_modules_remasked": self.masked_modules,
                "lora_update_norm2_dropped": round(self.dropped_fraction, 4)}


def _lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


@torch.no_grad()
def merge_lora_keep_sparsity(peft_model: nn.Module, masks: WeightMasks | None = None) -> LoraMerge:
    """Merge the active LoRA adapters of ``peft_model`` into its pruned base and re-apply the pruning masks.

    ``masks`` default to the zeros of the base weights before merging (``WeightMasks.from_model``). Returns a
    ``LoraMerge`` whose ``model`` is the plain transformers model (PEFT layers removed) with exactly the pruned
    model's zeros, and how much of the LoRA updates fell on pruned positions and was dropped.
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"merge_lora_keep_sparsity needs a peft.PeftModel (get_peft_model(pruned_model, "
                        f"LoraConfig(...))), got {type(peft_model).__name__}.")
    layers = _lora_layers(peft_model)
    if not layers:
        raise ValueError("merge_lora_keep_sparsity: the PeftModel has no LoRA layers to merge.")
    if masks is None:
        masks = WeightMasks.from_model(peft_model)
    if not isinstance(masks, WeightMasks):
        raise TypeError(f"masks must be a hf_prune.masks.WeightMasks, got {type(masks).__name__}.")
    if not masks.masks:
        raise ValueError("merge_lora_keep_sparsity: the base model holds no pruned weights; use "
                         "peft_model.merge_and_unload() for a dense model.")
    masks.bind(peft_model)  # every mask must name a weight of this model, with its shape

    dropped, total, per_module = 0.0, 0.0, {}
    for name, layer in layers.items():
        key = f"{name}.weight"
        if key not in masks.masks:
            continue
        mask = masks.masks[key].to(layer.get_base_layer().weight.device)
        delta = sum((layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A),
                    torch.zeros_like(mask, dtype=torch.float32))
        energy = float(delta.pow(2).sum())
        lost = float(delta[~mask].pow(2).sum())
        per_module[name] = lost / energy if energy > 0 else 0.0
        dropped += lost
        total += energy

    merged = peft_model.merge_and_unload()
    masks.apply_(merged)
    return LoraMerge(model=merged, masked_modules=len(per_module),
                     dropped_fraction=dropped / total if total > 0 else 0.0, per_module=per_module)
