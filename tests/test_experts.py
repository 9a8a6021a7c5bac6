"""Mixture-of-experts models (transformers 5's fused 3-D expert parameters): every expert is pruned as its own
Linear from the tokens the router sends it, starved experts are calibrated on all tokens and say so, the router
is left alone, and the fused stock layout is what gets saved."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batches, make_model, snapshot, unchanged

from hf_prune import CalibrationConfig, Pruner, PrunerConfig, WandaConfig
from hf_prune.errors import UnsupportedModelError
from hf_prune.methods.layerwise import LayerwiseProcessor
from hf_prune.patterns import nm_violations

CAL = CalibrationConfig(num_samples=8)


def _experts_entries(report: dict) -> dict[str, dict]:
    return {k: v for k, v in report["sparsity"]["per_module"].items() if "expert_tokens" in v}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_each_expert_is_calibrated_on_the_tokens_routed_to_it(family, tokenizer, corpus):
    model = make_model(family, vocab=len(tokenizer))
    batches = make_batches(family, tokenizer, corpus)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    result = Pruner(model, tokenizer).prune(WandaConfig(pattern="2:4", calibration=CAL), calibration_dataset=batches,
                                           progress=False)
    entries = _experts_entries(result.report)
    assert len(entries) == 2 * 2 * 4  # 2 layers x 4 experts x (gate_up_proj, down_proj)
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts."
        ups = {k: v for k, v in entries.items() if k.startswith(prefix) and k.endswith("gate_up_proj")}
        assert sum(v["expert_tokens"] for v in ups.values()) == 2 * real  # top-2: every real token reaches 2 experts
        assert all(v["calibrated_on"] == "routed tokens" for v in ups.values())
        experts = model.get_submodule(prefix[:-1])
        for param in (experts.gate_up_proj, experts.down_proj):
            for e in range(param.shape[0]):
                assert nm_violations(param[e], 2, 4) == 0 and int((param[e] == 0).sum()) == param[e].numel() // 2


def test_starved_experts_fall_back_to_all_tokens_and_match_the_all_tokens_option(tokenizer, corpus):
    batches = make_batches("mixtral", tokenizer, corpus)
    starved = make_model("mixtral", vocab=len(tokenizer))
    report = Pruner(starved, tokenizer).prune(WandaConfig(min_expert_tokens=10 ** 6, calibration=CAL),
                                              calibration_dataset=batches, progress=False).report
    assert {v["calibrated_on"] for v in _experts_entries(report).values()} == {"all tokens"}
    everything = make_model("mixtral", vocab=len(tokenizer))
    config = WandaConfig(expert_calibration="all_tokens", calibration=CAL)
    Pruner(everything, tokenizer).prune(config, calibration_dataset=batches, progress=False)
    for a, b in zip(starved.state_dict().values(), everything.state_dict().values()):
        assert torch.equal(a, b)
    routed = make_model("mixtral", vocab=len(tokenizer))
    Pruner(routed, tokenizer).prune(WandaConfig(calibration=CAL), calibration_dataset=batches, progress=False)
    assert not torch.equal(routed.model.layers[0].mlp.experts.down_proj, everything.model.layers[0].mlp.experts.down_proj)
    # the option is saved once set, and only then
    assert PrunerConfig.from_dict(config.to_dict()).expert_calibration == "all_tokens"
    assert "expert_calibration" not in WandaConfig().to_dict()
    with pytest.raises(ValueError, match="expert_calibration"):
        WandaConfig(expert_calibration="some")


def test_the_router_is_never_a_target(tokenizer, corpus):
    model = make_model("qwen2_moe", vocab=len(tokenizer))
    batches = make_batches("qwen2_moe", tokenizer, corpus)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".gate." in n or "expert_gate" in n}
    assert any("shared_expert_gate" in n for n in routers) and any("mlp.gate.weight" in n for n in routers)
    report = Pruner(model, tokenizer).prune(WandaConfig(calibration=CAL), calibration_dataset=batches,
                                           progress=False).report
    assert not [n for n in report["sparsity"]["per_module"] if "gate." in n or n.endswith("expert_gate")]
    for name, value in routers.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name


def test_an_experts_module_that_computes_otherwise_is_refused(tokenizer, corpus):
    model = make_model("mixtral", vocab=len(tokenizer))
    experts = model.model.layers[0].mlp.experts
    stock = experts.forward
    experts.forward = lambda *args, **kwargs: 2 * stock(*args, **kwargs)  # not the stock per-expert sum
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"MixtralExperts holds fused expert weights .* does not compute "
                       r"act\(gate\) \* up -> down per routed expert"):
        Pruner(model, tokenizer).prune(WandaConfig(calibration=CAL), calibration_dataset=make_batches(
            "mixtral", tokenizer, corpus), progress=False)
    assert unchanged(model, snap)


def test_deepseek_mla_latents_count_only_real_tokens(tokenizer, corpus):
    """DeepSeek-V3 feeds kv_b_proj a 4-D [batch, 1, tokens, rank] input: its padding is excluded like everyone's."""
    model = make_model("deepseek_v3", vocab=len(tokenizer))
    batches = make_batches("deepseek_v3", tokenizer, corpus)
    seen = {}

    class Recording(LayerwiseProcessor):
        def process(self, block_name, block, stats):
            seen.update({k: v.tokens for k, v in stats.items()})
            super().process(block_name, block, stats)

    from hf_prune.methods import layerwise

    original = layerwise.LayerwiseProcessor
    layerwise.LayerwiseProcessor = Recording
    try:
        Pruner(model, tokenizer).prune(WandaConfig(calibration=CAL), calibration_dataset=batches, progress=False)
    finally:
        layerwise.LayerwiseProcessor = original
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert seen["model.layers.0.self_attn.kv_b_proj"] == seen["model.layers.0.self_attn.q_a_proj"] == real


def test_first_order_ecoflap_refuses_expert_slices_and_takes_them_excluded(tokenizer, corpus):
    from hf_prune import ECoFLaPConfig

    batches = make_batches("mixtral", tokenizer, corpus)
    model = make_model("mixtral", vocab=len(tokenizer))
    snap = snapshot(model)
    first_order = dict(sparsity=0.5, score="first_order", num_score_samples=4, granularity="layer", calibration=CAL)
    with pytest.raises(UnsupportedModelError, match=r"first-order scores .* 16 targets are experts' slices .* "
                                                    r"score='zeroth_order'"):
        Pruner(model, tokenizer).prune(ECoFLaPConfig(**first_order), calibration_dataset=batches, progress=False)
    assert unchanged(model, snap)
    report = Pruner(model, tokenizer).prune(ECoFLaPConfig(**first_order, exclude_modules=["experts"]),
                                            calibration_dataset=batches, progress=False).report
    assert report["sparsity"]["per_module"] and not _experts_entries(report)


def test_mask_keeping_covers_the_fused_experts(tokenizer, corpus):
    from hf_prune.training.weight_masks import WeightMasks

    model = make_model("mixtral", vocab=len(tokenizer))
    Pruner(model, tokenizer).prune(WandaConfig(pattern="2:4", calibration=CAL),
                                   calibration_dataset=make_batches("mixtral", tokenizer, corpus), progress=False)
    masks = WeightMasks.from_model(model)
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"} <= set(masks.masks)
    experts = model.model.layers[0].mlp.experts
    zeros = experts.down_proj == 0
    with torch.no_grad():  # a training step that moved every weight
        experts.down_proj.add_(0.1)
    masks.apply_(model)
    assert torch.equal(experts.down_proj == 0, zeros)
