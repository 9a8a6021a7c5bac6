"""Generic block discovery (``hf_prune.models.discovery``): a model no family file covers is pruned from what
transformers declares about it, the walk is checked by replaying its first blocks against the real forward, and
nothing that cannot be replayed, or has nothing to prune, ever passes as a success."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import DISCOVERED, make_batches, make_model, snapshot, unchanged
from torch import nn

from hf_prune import CalibrationConfig, MagnitudeConfig, Pruner, SparseGPTConfig, WandaConfig
from hf_prune.engine.walker import _run_block, calibration_mode, capture_stage_inputs, first_tensor
from hf_prune.errors import UnsupportedModelError
from hf_prune.models import block_lists, get_family
from hf_prune.patterns import nm_violations


class TinyDecoderConfig(T.PretrainedConfig):
    model_type = "tiny-user-decoder"

    def __init__(self, vocab_size=512, hidden_size=32, num_hidden_layers=2, gain_outside=False, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.gain_outside = gain_outside
        super().__init__(**kwargs)


class TinyBlock(nn.Module):
    """A pre-norm residual block: causal single-head attention and a gated MLP (the usual decoder shape)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.gate, self.down = nn.Linear(width, 2 * width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.gain = 1.0  # a user model that sets this around its forward cannot be replayed block by block

    def forward(self, hidden, attention_mask=None, position_scale=None):
        x = self.norm1(hidden)
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask[:, None, :] == 0, float("-inf"))
        hidden = hidden + self.o(torch.nan_to_num(scores.softmax(-1)) @ v) * position_scale
        x = self.norm2(hidden)
        return hidden + self.gain * self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class TinyPreTrained(T.PreTrainedModel):
    config_class = TinyDecoderConfig
    base_model_prefix = "model"
    _no_split_modules = ["TinyBlock"]


class TinyModel(TinyPreTrained):
    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TinyBlock(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.embed(input_ids)
        scale = torch.full((), 0.5)
        for layer in self.layers:
            if self.config.gain_outside:
                layer.gain = 2.0
            try:
                hidden = layer(hidden, attention_mask=attention_mask, position_scale=scale)
            finally:
                layer.gain = 1.0
        return T.modeling_outputs.BaseModelOutput(last_hidden_state=self.norm(hidden))


class TinyForCausalLM(TinyPreTrained):
    def __init__(self, config):
        super().__init__(config)
        self.model = TinyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.model(input_ids, attention_mask=attention_mask).last_hidden_state
        return T.modeling_outputs.CausalLMOutput(logits=self.lm_head(hidden))


def _user_model(vocab: int, **config) -> TinyForCausalLM:
    torch.manual_seed(0)
    return TinyForCausalLM(TinyDecoderConfig(vocab_size=vocab, **config)).eval()


def test_a_user_defined_decoder_prunes_through_generic_discovery(tokenizer, corpus):
    model = _user_model(len(tokenizer))
    family = get_family(model)
    assert family.generic and family.causal_lm and family.name == "tiny-user-decoder"
    [stage] = family.stages(model)
    assert (stage.name, stage.path) == ("decoder", "model.layers") and "_no_split_modules" in stage.origin
    batches = make_batches("llama", tokenizer, corpus)
    result = Pruner(model, tokenizer).prune(SparseGPTConfig(pattern="2:4", calibration=CalibrationConfig(num_samples=8)),
                                           calibration_dataset=batches, progress=False)
    per_module = result.report["sparsity"]["per_module"]
    assert len(per_module) == 2 * 7  # q, k, v, o, up, gate, down in each of the 2 blocks; lm_head left alone
    for name in per_module:
        weight = model.get_submodule(name).weight
        assert nm_violations(weight, 2, 4) == 0 and int((weight == 0).sum()) == weight.numel() // 2, name
    assert not bool((model.lm_head.weight == 0).any())


def test_a_block_that_cannot_be_replayed_is_refused_before_any_change(tokenizer, corpus):
    model = _user_model(len(tokenizer), gain_outside=True)  # the model sets block.gain around each call
    snap = snapshot(model)
    batches = make_batches("llama", tokenizer, corpus)
    with pytest.raises(UnsupportedModelError, match=r"decoder stage at model\.layers \(generic discovery: "
                       r"ModuleLists of TinyBlock.*replaying model\.layers\.0 with the inputs captured from the "
                       r"real forward does not reproduce.*Nothing was changed"):
        Pruner(model, tokenizer).prune(WandaConfig(calibration=CalibrationConfig(num_samples=8)),
                                       calibration_dataset=batches, progress=False)
    assert unchanged(model, snap)


def test_a_model_with_no_blocks_is_refused_naming_what_was_looked_for(tokenizer):
    class Flat(TinyPreTrained):
        def __init__(self, config):
            super().__init__(config)
            self.proj = nn.Linear(config.hidden_size, config.hidden_size)
            self.post_init()

    model = Flat(TinyDecoderConfig())
    assert block_lists(model) == ([], "")
    with pytest.raises(UnsupportedModelError, match=r"model_type='tiny-user-decoder'.*generic block discovery found "
                       r"no blocks: it declares _no_split_modules \['TinyBlock'\].*register_family"):
        Pruner(model, tokenizer).prune(MagnitudeConfig(), progress=False)


def test_blocks_without_a_linear_layer_are_an_error_not_an_empty_success(tokenizer):
    """A family whose blocks hold nothing a layer-wise pruner prunes (ResNet's convolutions): refused."""
    torch.manual_seed(0)
    model = T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks \(resnet.encoder.stages\) hold no nn.Linear, Conv1D or fused "
                                         "experts layer to prune"):
        Pruner(model).prune(MagnitudeConfig(), progress=False)
    assert unchanged(model, snap)


def test_targets_filtered_to_nothing_are_an_error(tokenizer):
    model = _user_model(len(tokenizer))
    with pytest.raises(ValueError, match="leave no module to prune"):
        Pruner(model, tokenizer).prune(MagnitudeConfig(target_modules=["q$"], exclude_modules=[r"\.q$"]),
                                       progress=False)


def test_tp_plan_gives_the_mlp_spec_of_a_plain_gated_mlp():
    model = T.Gemma2ForCausalLM(T.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    [stage] = get_family(model).stages(model)
    assert stage.mlp is not None and stage.mlp.inputs == ("mlp.gate_proj", "mlp.up_proj")
    assert (stage.mlp.output, stage.mlp.width_key) == ("mlp.down_proj", "intermediate_size")
    phi3 = T.Phi3ForCausalLM(T.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    assert get_family(phi3).stages(phi3)[0].mlp is None  # fused gate_up_proj: not a plain neuron spec


@pytest.mark.parametrize("family", list(DISCOVERED.values()))
def test_discovered_stages_replay_every_block_of_the_real_forward(family, tokenizer, corpus):
    """Walking the blocks one at a time on the captured inputs gives the real forward's last block output; where
    blocks take their own extra inputs (Gemma 3's and ModernBERT's per-layer-type rotary tables and masks, Swin's
    input resolution per stage, T5's position bias handed on by the first block) each block gets its own."""
    model = make_model(family, vocab=len(tokenizer))
    batches = make_batches(family, tokenizer, corpus, n=4, batch=2)
    family_spec = get_family(model)
    stages = family_spec.stages(model)
    assert family_spec.generic and len(stages) == (2 if family in ("t5", "bart", "whisper", "siglip", "llava",
                                                                   "qwen2_vl", "gemma3") else 1)
    own = set()
    for stage in stages:
        expected = []
        handle = stage.blocks(model)[-1].register_forward_hook(lambda m, a, o: expected.append(first_tensor(o)))
        with calibration_mode(model):
            for batch in batches:
                stage.run(model, batch)
            handle.remove()
            inputs = capture_stage_inputs(model, stage, stages, batches, torch.device("cpu"))
            for index, block in enumerate(stage.blocks(model)):
                inputs.hidden = [_run_block(block, inputs, i, torch.device("cpu"), index) for i in range(len(batches))]
        for got, want in zip(inputs.hidden, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if any(inputs.own):
            own.add(stage.name)
    assert own == {"gemma3_text": {"decoder"}, "modernbert": {"encoder"}, "swin": {"encoder"},
                   "t5": {"encoder", "decoder"}}.get(family, set()), family


def test_the_replay_check_catches_t5s_position_bias_if_every_block_got_the_first_ones_inputs(tokenizer, corpus,
                                                                                            monkeypatch):
    """T5's first block computes the relative position bias and hands it on: were block 1 replayed with block 0's
    inputs (no per-block inputs), the replay would differ from the real forward, and the run is refused."""
    from hf_prune.engine import walker

    monkeypatch.setattr(walker, "_differs", lambda first, other: [])
    model = make_model("t5", vocab=len(tokenizer))
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"encoder stage at encoder\.block.*replaying encoder\.block\.1 with "
                                                      r"the first block's output and its own captured inputs does not "
                                                      r"reproduce the real forward"):
        Pruner(model, tokenizer).prune(WandaConfig(calibration=CalibrationConfig(num_samples=8)),
                                       calibration_dataset=make_batches("t5", tokenizer, corpus), progress=False)
    assert unchanged(model, snap)


def test_cards_of_discovered_families_get_the_pipeline_tag_transformers_implies():
    from hf_prune.artifacts.cards import pipeline_tag

    expected = {"GPT2LMHeadModel": "text-generation", "MixtralForCausalLM": "text-generation",
                "T5ForConditionalGeneration": "text2text-generation",
                "WhisperForConditionalGeneration": "automatic-speech-recognition",
                "LlavaForConditionalGeneration": "image-text-to-text", "SiglipModel": "zero-shot-image-classification",
                "DeiTForImageClassification": "image-classification", "RobertaModel": "feature-extraction"}
    for cls, tag in expected.items():
        assert pipeline_tag(cls, "not-a-family-file") == tag, cls
    assert pipeline_tag("BertModel", "bert") == "feature-extraction"  # family files keep theirs


def test_a_walk_that_misses_selected_modules_is_an_error_not_a_partial_success(tokenizer, corpus, monkeypatch):
    from hf_prune.methods import layerwise

    process = layerwise.LayerwiseProcessor.process
    monkeypatch.setattr(layerwise.LayerwiseProcessor, "process", lambda self, name, block, stats: (
        None if name.endswith(".1") else process(self, name, block, stats)))
    model = _user_model(len(tokenizer))
    with pytest.raises(UnsupportedModelError, match=r"7 of the 14 selected modules were never reached by the block "
                                                     r"walk \(e\.g\. model\.layers\.1\.q\)"):
        Pruner(model, tokenizer).prune(MagnitudeConfig(), progress=False)
