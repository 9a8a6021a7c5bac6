"""Structured attention removal: q-k dimensions, v-o dimensions and whole heads leave the model exactly (the
smaller block computes what the zeroed block computes), uniform geometries go into the stock config, per-block
ones reload through the layout file, and RoPE/GQA constraints are enforced."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from conftest import FAMILIES, make_batches, make_model
from test_structured import _out

from hf_prune.models import get_family
from hf_prune.structured import (
    attention_groups,
    needs_variable_layout,
    save_variable_layout,
    set_attention_geometry,
    shrink_attention,
    zero_attention,
)


def _random_keeps(group, g: torch.Generator, uniform: bool):
    hd, qk, vo = group.head_dim, [], []
    for h in range(group.kv_heads):
        if group.rope:  # whole rotary pairs
            n = hd // 4 if uniform else int(torch.randint(1, hd // 2, (1,), generator=g))
            pairs = torch.randperm(hd // 2, generator=g)[:n]
            qk.append(torch.cat([pairs, pairs + hd // 2]))
        else:
            qk.append(torch.randperm(hd, generator=g)[: hd // 2 if uniform else int(torch.randint(0, hd, (1,),
                                                                                               generator=g))])
        if uniform:
            vo.append(torch.randperm(hd, generator=g)[: 3 * hd // 4] if h else torch.tensor([], dtype=torch.long))
        else:  # head 0 loses every v-o dimension: it leaves whole
            vo.append(torch.randperm(hd, generator=g)[: int(torch.randint(1, hd, (1,), generator=g))] if h else [])
    return qk, vo


@pytest.mark.parametrize("family", FAMILIES)
def test_shrink_equals_zeroing_and_reloads(family, tokenizer, corpus, tmp_path):
    model = make_model(family, vocab=len(tokenizer))
    reference = make_model(family, vocab=len(tokenizer))
    batch = make_batches(family, tokenizer, corpus, n=2, batch=2)[0]
    groups = attention_groups(model)
    assert groups and all(g.heads == 4 and g.head_dim == 16 for g in groups)
    assert {g.kv_heads for g in groups} == ({2} if family == "llama" else {4})
    g = torch.Generator().manual_seed(0)
    for group, ref_group in zip(groups, attention_groups(reference)):
        qk, vo = _random_keeps(group, g, uniform=False)
        zero_attention(reference, ref_group, qk, vo)
        geometry = shrink_attention(model, group, qk, vo)
        assert geometry["kv_heads"] == group.kv_heads == ref_group.kv_heads - 1
        assert geometry["head_dim"] == (16 if family == "llama" else max(max(len(q), len(v)) for q, v in
                                                                          zip(qk[1:], vo[1:])))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in reference.parameters())
    torch.testing.assert_close(_out(model, batch), _out(reference, batch), rtol=1e-5, atol=1e-5)
    for stage in get_family(model).stages(model):
        set_attention_geometry(model, stage)
    model.save_pretrained(tmp_path)
    if needs_variable_layout(model):
        save_variable_layout(model, str(tmp_path))
        auto = json.load(open(tmp_path / "config.json"))["auto_map"]
        loader = getattr(T, next(k for k in auto if k != "AutoConfig"))
        loaded = loader.from_pretrained(tmp_path, trust_remote_code=True)
    else:
        loaded = getattr(T, type(model).__name__).from_pretrained(tmp_path)
    torch.testing.assert_close(_out(loaded, batch), _out(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["vit", "llama"])
def test_uniform_geometry_goes_into_the_stock_config(family, tokenizer, corpus, tmp_path):
    model = make_model(family, vocab=len(tokenizer))
    reference = make_model(family, vocab=len(tokenizer))
    batch = make_batches(family, tokenizer, corpus, n=2, batch=2)[0]
    g = torch.Generator().manual_seed(1)
    for group, ref_group in zip(attention_groups(model), attention_groups(reference)):
        qk, vo = _random_keeps(group, g, uniform=True)
        zero_attention(reference, ref_group, qk, vo)
        shrink_attention(model, group, qk, vo)
    stage = get_family(model).stages(model)[0]
    assert set_attention_geometry(model, stage)
    assert not needs_variable_layout(model)
    if family == "vit":  # 3 heads of 12: the softmax scale of the old width is folded into q
        assert (model.config.num_attention_heads, model.config.head_dim) == (3, 12)
    else:  # rotary: one key/value group (2 query heads) left, head width unchanged
        assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 16)
    torch.testing.assert_close(_out(model, batch), _out(reference, batch), rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = getattr(T, type(model).__name__).from_pretrained(tmp_path)  # plain stock class, no remote code
    torch.testing.assert_close(_out(loaded, batch), _out(model, batch), rtol=0, atol=0)


def test_attention_slicing_validates_before_changing(tokenizer):
    llama = make_model("llama", vocab=len(tokenizer))
    group = attention_groups(llama)[0]
    full = [torch.arange(16), torch.arange(16)]
    before = llama.model.layers[0].self_attn.k_proj.weight.clone()
    with pytest.raises(ValueError, match=r"rotary q-k dimensions come in pairs \(d, d \+ 8\)"):
        shrink_attention(llama, group, [torch.arange(16), torch.tensor([0, 1, 8])], full)
    with pytest.raises(ValueError, match="every v-o dimension would be removed"):
        shrink_attention(llama, group, full, [[], []])
    with pytest.raises(ValueError, match=r"dimensions of head 1 must lie in \[0, 16\)"):
        shrink_attention(llama, group, full, [torch.arange(16), [16]])
    with pytest.raises(ValueError, match=r"one list of kept dimensions per key/value head \(2\), got 1"):
        shrink_attention(llama, group, [torch.arange(16)], full)
    with pytest.raises(ValueError, match="duplicates"):
        shrink_attention(llama, group, full, [[1, 1], [2]])
    assert torch.equal(llama.model.layers[0].self_attn.k_proj.weight, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reads_off_a_smaller_model_equal_to_its_masks(family, tokenizer, corpus, tmp_path):
    """SPP's read-off on every supported family: hooks with 0/1 masks == zeroed weights == the sliced model,
    which saves and reloads with stock transformers."""
    from hf_prune import SPPConfig
    from hf_prune.methods.spp import attach_masks, save_model

    model = make_model(family, vocab=len(tokenizer))
    batch = make_batches(family, tokenizer, corpus, n=2, batch=2)[0]
    dense = _out(model, batch)
    masks = attach_masks(model, SPPConfig(share_across_heads=family in ("vit", "clip")))
    torch.testing.assert_close(_out(model, batch), dense, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for state in masks.units:
            state.first_entry.copy_(torch.rand(state.first_entry.shape, generator=g))
    path = masks.solution_path(model)
    masks.set_masks(path.masks_at(0.5))
    hooked = _out(model, batch)
    masks.remove(model)
    torch.testing.assert_close(_out(model, batch), dense, rtol=0, atol=0)
    small = path.materialize(model, 0.5)
    torch.testing.assert_close(_out(path.apply(model, 0.5), batch), hooked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_out(small, batch), hooked, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    folder = save_model(small, tmp_path / "small")
    config = json.load(open(tmp_path / "small" / "config.json"))
    if "auto_map" in config:
        loaded = getattr(T, next(k for k in config["auto_map"] if k != "AutoConfig")).from_pretrained(
            folder, trust_remote_code=True)
    else:
        loaded = getattr(T, type(small).__name__).from_pretrained(folder)
    torch.testing.assert_close(_out(loaded, batch), _out(small, batch), rtol=0, atol=0)
