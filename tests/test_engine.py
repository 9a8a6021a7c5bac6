"""The calibration engine: captured kwargs replay the real forward, pruned outputs feed the next block,
padding never counts, data-free methods run no forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_batches, make_model

from hf_prune import CalibrationConfig, MagnitudeConfig, Pruner, WandaConfig
from hf_prune.engine.stats import StatsCollector
from hf_prune.engine.targets import plan_targets
from hf_prune.engine.walker import _run_block, calibration_mode, capture_stage_inputs, walk
from hf_prune.methods.layerwise import LayerwiseProcessor
from hf_prune.models import get_family


def _last_block_outputs(model, stage, batches):
    """What the last block of ``stage`` outputs in an ordinary full forward of each batch."""
    outputs = []
    block = stage.blocks(model)[-1]
    handle = block.register_forward_hook(lambda m, a, o: outputs.append(o if torch.is_tensor(o) else o[0]))
    with calibration_mode(model):
        for batch in batches:
            stage.run(model, batch)
    handle.remove()
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_inputs_replay_the_real_forward(family, tokenizer, corpus):
    model = make_model(family, vocab=len(tokenizer))
    batches = make_batches(family, tokenizer, corpus)
    stages = get_family(model).stages(model)
    assert {"llama": 1, "opt": 1, "bert": 1, "vit": 1, "clip": 2, "blip2": 3}[family] == len(stages)
    for stage in stages:
        expected = _last_block_outputs(model, stage, batches)
        with calibration_mode(model):
            inputs = capture_stage_inputs(model, stage, stages, batches, torch.device("cpu"))
            for block in stage.blocks(model):
                inputs.hidden = [_run_block(block, inputs, i, torch.device("cpu")) for i in range(len(batches))]
        for got, want in zip(inputs.hidden, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if family == "llama":
            assert "position_embeddings" in inputs.kwargs[0] and inputs.kwargs[0].get("past_key_values") is None


def test_next_block_sees_the_pruned_outputs(tokenizer, corpus):
    """Block 1's statistics must come from block 0 *after* pruning: recompute them from the final model."""
    model = make_model("llama", vocab=len(tokenizer))
    batches = make_batches("llama", tokenizer, corpus)
    config = WandaConfig(sparsity=0.6)
    stages = get_family(model).stages(model)
    seen = {}

    class Recording(LayerwiseProcessor):
        def process(self, block_name, block, stats):
            seen.update({k: v.col_sq_mean.clone() for k, v in stats.items()})
            super().process(block_name, block, stats)

    walk(model, stages, batches, Recording(config, plan_targets(model, stages, config)), device=torch.device("cpu"),
         progress=False)
    name = "model.layers.1.self_attn.q_proj"
    module = model.get_submodule(name)
    with calibration_mode(model), StatsCollector({name: (module, frozenset({"sq_norm"}))}) as collector:
        for batch in batches:
            collector.token_mask = batch["attention_mask"].bool()
            model(**batch)
    torch.testing.assert_close(seen[name], collector.stats[name].col_sq_mean, rtol=1e-5, atol=1e-6)
    # and these differ from the dense model's, so the test would notice a walker that forgot to re-run
    dense = make_model("llama", vocab=len(tokenizer))
    module = dense.get_submodule(name)
    with calibration_mode(dense), StatsCollector({name: (module, frozenset({"sq_norm"}))}) as collector:
        for batch in batches:
            collector.token_mask = batch["attention_mask"].bool()
            dense(**batch)
    assert not torch.allclose(seen[name], collector.stats[name].col_sq_mean, rtol=1e-3)


def test_padding_tokens_are_excluded(tokenizer, corpus):
    model = make_model("bert", vocab=len(tokenizer))
    batches = make_batches("bert", tokenizer, corpus, n=8, batch=4, seq=24)
    real = int(sum(b["attention_mask"].sum() for b in batches))
    assert real < sum(b["attention_mask"].numel() for b in batches)  # there is padding to exclude
    stages = get_family(model).stages(model)
    config = WandaConfig()
    counted = {}

    class Counting(LayerwiseProcessor):
        def process(self, block_name, block, stats):
            counted.update({k: (v.tokens, v.sq_sum.clone()) for k, v in stats.items()})
            super().process(block_name, block, stats)

    walk(model, stages, batches, Counting(config, plan_targets(model, stages, config)), device=torch.device("cpu"),
         progress=False)
    assert {tokens for tokens, _ in counted.values()} == {real}
    # and the sums equal those over real tokens only
    name = "encoder.layer.0.attention.self.query"
    xs = []
    module = make_model("bert", vocab=len(tokenizer)).eval()
    handle = module.get_submodule(name).register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    with torch.no_grad():
        for b in batches:
            module(**b)
    handle.remove()
    manual = sum((x[b["attention_mask"].bool()] ** 2).sum(0) for x, b in zip(xs, batches))
    torch.testing.assert_close(counted[name][1], manual, rtol=1e-5, atol=1e-5)


def test_data_free_method_runs_no_forward(tokenizer):
    model = make_model("llama", vocab=len(tokenizer))
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    result = Pruner(model, tokenizer).prune(MagnitudeConfig(sparsity=0.3), progress=False)
    assert calls == [] and result.report["calibration"]["source"] is None
    assert result.sparsity == pytest.approx(0.3, abs=1e-3)


def test_calibration_from_text_with_concat_windows(tokenizer, corpus):
    model = make_model("llama", vocab=len(tokenizer))
    config = WandaConfig(calibration=CalibrationConfig(num_samples=6, seq_len=32, batch_size=4))
    result = Pruner(model, tokenizer).prune(config, calibration_dataset=corpus[:300], progress=False)
    cal = result.report["calibration"]
    assert cal["packing"] == "concat" and cal["real_tokens"] == 6 * 32 and cal["num_samples"] == 6
    assert cal["source"].startswith("<in-memory list of 300 texts")


def test_model_state_restored_after_walk(tokenizer, corpus):
    model = make_model("opt", vocab=len(tokenizer))
    model.train()
    assert model.config.use_cache
    Pruner(model, tokenizer).prune(WandaConfig(calibration=CalibrationConfig(num_samples=4, seq_len=16)),
                                   calibration_dataset=corpus[:200], progress=False)
    assert model.training and model.config.use_cache
    assert all(p.requires_grad for p in model.parameters())


def test_streamed_capture_path_hooks_are_transparent(tokenizer, corpus):
    """The accelerator path (model on CPU, blocks streamed to the execution device during a capture forward)
    runs here with the device 'cpu:0', which differs from the tensors' 'cpu' and so takes that path: its hooks
    must not alter inputs or outputs, and everything must be back where it was afterwards."""
    model = make_model("blip2", vocab=len(tokenizer))
    batches = make_batches("blip2", tokenizer, corpus, n=4, batch=2)
    stages = get_family(model).stages(model)
    with calibration_mode(model):
        plain = capture_stage_inputs(model, stages[2], stages, batches, torch.device("cpu"))
        streamed = capture_stage_inputs(model, stages[2], stages, batches, torch.device("cpu", 0))
    for a, b in zip(plain.hidden, streamed.hidden):
        assert torch.equal(a, b)
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == []
