"""Structured MLP removal: exact (equals zeroing the neurons), and the smaller model reloads with the
stock class from its rewritten config."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from conftest import FAMILIES, make_batches, make_model

from hf_prune.models import get_family
from hf_prune.structured import keep_columns, keep_rows, mlp_groups, set_mlp_width, shrink_mlp


def _out(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    if isinstance(model, T.CLIPModel):
        return torch.cat([out.text_embeds.flatten(), out.image_embeds.flatten()])
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_shrink_equals_zeroing_and_reloads(family, tokenizer, corpus, tmp_path):
    model = make_model(family, vocab=len(tokenizer))
    reference = make_model(family, vocab=len(tokenizer))
    batch = make_batches(family, tokenizer, corpus, n=4, batch=4)[0]
    stages = get_family(model).stages(model)
    groups = mlp_groups(model)
    assert len(groups) == sum(len(s.blocks(model)) for s in stages)
    g = torch.Generator().manual_seed(0)
    for group, ref_group in zip(groups, mlp_groups(reference)):
        keep = torch.randperm(group.width, generator=g)[: group.width * 3 // 4]
        drop = torch.ones(group.width, dtype=torch.bool)
        drop[keep] = False
        with torch.no_grad():  # the reference zeroes the same neurons in place
            for name in ref_group.inputs:
                lin = reference.get_submodule(name)
                lin.weight[drop] = 0
                if lin.bias is not None:
                    lin.bias[drop] = 0
        shrink_mlp(model, group, keep)
    for stage in stages:
        assert set_mlp_width(model, stage) == 96
    torch.testing.assert_close(_out(model, batch), _out(reference, batch), rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = getattr(T, type(model).__name__).from_pretrained(tmp_path)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in reference.parameters())
    torch.testing.assert_close(_out(reloaded, batch), _out(model, batch), rtol=0, atol=0)


def test_non_uniform_widths_are_refused(tokenizer):
    model = make_model("opt", vocab=len(tokenizer))
    groups = mlp_groups(model)
    shrink_mlp(model, groups[0], list(range(100)))
    with pytest.raises(ValueError, match=r"different MLP widths \[100, 128\].*same number of neurons"):
        set_mlp_width(model, get_family(model).stages(model)[0])


def test_slicing_validates_indices():
    lin = torch.nn.Linear(4, 6)
    with pytest.raises(ValueError, match="cannot keep zero"):
        keep_rows(lin, [])
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\)"):
        keep_rows(lin, [0, 6])
    with pytest.raises(ValueError, match="duplicates"):
        keep_columns(lin, [1, 1])
    keep_rows(lin, [5, 0])
    keep_columns(lin, [3])
    assert lin.weight.shape == (2, 1) and lin.bias.shape == (2,) and (lin.out_features, lin.in_features) == (2, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_widths_reload_with_stock_auto_classes(family, tokenizer, corpus, tmp_path):
    """Different widths per block cannot live in a stock config: the layout file makes them reload through
    transformers' own trust_remote_code path, with identical outputs and no hf_prune import."""
    import subprocess
    import sys

    from hf_prune.structured.layout import needs_variable_layout, save_variable_layout

    model = make_model(family, vocab=len(tokenizer))
    batch = make_batches(family, tokenizer, corpus, n=2, batch=2)[0]
    assert not needs_variable_layout(model)
    for i, group in enumerate(mlp_groups(model)):
        shrink_mlp(model, group, list(range(0, group.width - 8 * (i + 1))))
    assert needs_variable_layout(model)
    model.save_pretrained(tmp_path)
    layout = save_variable_layout(model, str(tmp_path))
    assert len(layout["linears"]) >= len(mlp_groups(model))
    auto = json.load(open(tmp_path / "config.json"))["auto_map"]
    auto_name = next(k for k in auto if k != "AutoConfig")
    loaded = getattr(T, auto_name).from_pretrained(tmp_path, trust_remote_code=True)
    torch.testing.assert_close(_out(loaded, batch), _out(model, batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="trust_remote_code"):
        getattr(T, auto_name).from_pretrained(tmp_path, trust_remote_code=False)
    if family == "llama":  # a fresh interpreter without hf_prune on the path loads it too
        code = (f"import sys; sys.modules['hf_prune'] = None; import transformers as T; "
                f"m = T.{auto_name}.from_pretrained({str(tmp_path)!r}, trust_remote_code=True); "
                "print(m.model.layers[1].mlp.down_proj.in_features)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == str(128 - 16)
