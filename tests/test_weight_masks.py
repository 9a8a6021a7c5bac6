"""WeightMasks keeps pruned weights exactly zero through AdamW with weight decay, N:M groups intact."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from hf_prune import MagnitudeConfig, Pruner
from hf_prune.patterns import nm_violations
from hf_prune.training.weight_masks import WeightMasks


def _train(model, masks, steps=5, use_masks=True):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        ids = torch.randint(6, 500, (2, 16), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if use_masks:
            masks.mask_grads_(model)
        opt.step()
        if use_masks:
            masks.clean_optimizer_(opt, model)
            masks.apply_(model)
        opt.zero_grad()
    return opt


def test_masks_survive_adamw(tokenizer):
    model = make_model("llama", vocab=len(tokenizer))
    Pruner(model, tokenizer).prune(MagnitudeConfig(pattern="2:4"), progress=False)
    masks = WeightMasks.from_model(model)
    assert len(masks.masks) == 14 and masks.sparsity() == pytest.approx(0.5)
    opt = _train(model, masks)
    assert masks.violations(model) == 0
    for name in masks.masks:
        w = model.get_parameter(name)
        assert nm_violations(w, 2, 4) == 0
        state = opt.state[w]
        assert bool((state["exp_avg"][~masks.masks[name]] == 0).all())
        assert bool((state["exp_avg_sq"][~masks.masks[name]] == 0).all())
    # without the masks, AdamW revives the pruned weights: the test above can fail
    model2 = make_model("llama", vocab=len(tokenizer))
    Pruner(model2, tokenizer).prune(MagnitudeConfig(pattern="2:4"), progress=False)
    masks2 = WeightMasks.from_model(model2)
    _train(model2, masks2, use_masks=False)
    assert masks2.violations(model2) > 0


def test_binding_through_wrappers_and_errors(tokenizer):
    model = make_model("opt", vocab=len(tokenizer))
    Pruner(model, tokenizer).prune(MagnitudeConfig(target_modules=["fc1"]), progress=False)
    masks = WeightMasks.from_model(model)
    assert set(masks.masks) == {"model.decoder.layers.0.fc1.weight", "model.decoder.layers.1.fc1.weight"}
    wrapper = torch.nn.Module()
    wrapper.module = model  # like DDP
    masks.apply_(wrapper)
    restored = WeightMasks.from_state_dict(masks.state_dict())
    assert restored.violations(model) == 0
    with pytest.raises(ValueError, match="no nn.Linear named 'nope'"):
        WeightMasks.from_model(model, modules=["nope"])
    bad = WeightMasks({"model.decoder.layers.0.fc1.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="changed shape"):
        bad.apply_(model)
