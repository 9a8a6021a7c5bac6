"""Every bad input raises the promised error before any weight changes; failures leave nothing behind."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as T
from conftest import make_batches, make_model, snapshot, unchanged

from hf_prune import CalibrationConfig, ECoFLaPConfig, MagnitudeConfig, Pruner, SparseGPTConfig, WandaConfig
from hf_prune.errors import (
    CalibrationDataError,
    NonFiniteStatisticsError,
    NonFiniteWeightsError,
    OutputDirError,
    UnsupportedModelError,
)

CAL = CalibrationConfig(num_samples=4, seq_len=16)


@pytest.mark.parametrize("config,calibration,error,words", [
    (WandaConfig(target_modules=["nonexistent"]), None, ValueError,
     "target_modules regex 'nonexistent' matches no Linear layer inside the transformer blocks"),
    (WandaConfig(target_modules=["lm_head"]), None, ValueError, "outside the transformer blocks"),
    (WandaConfig(exclude_modules=["qproj"]), None, ValueError, "exclude_modules regex 'qproj' matches no"),
    (WandaConfig(target_modules=["q_proj"], exclude_modules=["proj"]), None, ValueError, "leave no module"),
    (WandaConfig(module_sparsity={"model.layers.0.mlp.upproj": 0.3}), None, ValueError,
     "Did you mean model.layers.0.mlp.up_proj"),
    (WandaConfig(calibration=CAL), None, CalibrationDataError, "no calibration data was given"),
    (WandaConfig(calibration=CAL), [], CalibrationDataError, "no calibration data was given|empty"),
    (WandaConfig(calibration=CAL), ["", "   "], CalibrationDataError, "no non-empty text"),
    (WandaConfig(calibration=CAL), ["too short"], CalibrationDataError, "too short"),
    (WandaConfig(calibration=CalibrationConfig(num_samples=4, seq_len=16, packing="pad")), ["a", "b"],
     CalibrationDataError, "2 non-empty texts, fewer than num_samples=4"),
    (WandaConfig(calibration=CAL), [{"content": "x"}], CalibrationDataError, "no tensors"),
])
def test_bad_input_leaves_model_untouched(config, calibration, error, words, tokenizer):
    model = make_model("llama", vocab=len(tokenizer))
    snap = snapshot(model)
    with pytest.raises(error, match=words):
        Pruner(model, tokenizer).prune(config, calibration_dataset=calibration, progress=False)
    assert unchanged(model, snap)


def test_missing_text_column(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"body": "some text here"}\n{"body": "more text"}\n')
    model = make_model("llama", vocab=len(tokenizer))
    snap = snapshot(model)
    with pytest.raises(CalibrationDataError, match=r"no text column 'text' \(its columns: \['body'\]\).*text_column"):
        Pruner(model, tokenizer).prune(WandaConfig(calibration=CAL), calibration_dataset=str(path), progress=False)
    assert unchanged(model, snap)


def test_nm_pattern_needs_divisible_width(tokenizer):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=60, intermediate_size=96,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"multiple of 8, but 6 are not: model.layers.0.self_attn.q_proj \(in_features=60\)"):
        Pruner(model, tokenizer).prune(MagnitudeConfig(pattern="4:8"), progress=False)
    assert unchanged(model, snap)
    Pruner(model, tokenizer).prune(MagnitudeConfig(pattern="2:4"), progress=False)  # 60 and 96 divide by 4


def test_unsupported_family_names_the_known_ones(tokenizer):
    """A model without a family file whose blocks generic discovery cannot find either (T5's blocks are found but
    its configuration here has none: zero layers)."""
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=0, n_head=2))
    with pytest.raises(UnsupportedModelError, match=r"model_type='gpt2'.*no blocks.*llama \(llama, mistral, qwen2, qwen3\).*opt"):
        Pruner(model, tokenizer).prune(MagnitudeConfig(), progress=False)


def test_bad_config_object_and_device(tokenizer):
    model = make_model("llama", vocab=len(tokenizer))
    with pytest.raises(TypeError, match="needs a PrunerConfig"):
        Pruner(model, tokenizer).prune("wanda")
    with pytest.raises(ValueError, match="device='gpu0' is not a valid torch device"):
        Pruner(model, tokenizer).prune(MagnitudeConfig(), device="gpu0", progress=False)
    with pytest.raises(TypeError, match="transformers model"):
        Pruner("meta-llama/Llama-2-7b-hf")


def test_overflowing_activations_stop_before_any_change(tokenizer, corpus):
    model = make_model("bert", vocab=len(tokenizer))
    with torch.no_grad():  # finite weights, but the embeddings' LayerNorm output overflows float32
        model.embeddings.LayerNorm.weight.fill_(3e38)
    snap = snapshot(model)
    with pytest.raises(NonFiniteStatisticsError, match=r"^NaN/inf in the inputs of encoder.layer.0 before it was "
                       r"pruned; the model's forward pass overflows in torch.float32 on these inputs \(check the "
                       r"inputs\).$"):
        Pruner(model, tokenizer).prune(WandaConfig(calibration=CAL), calibration_dataset=corpus[:200],
                                       progress=False)
    assert unchanged(model, snap)


def test_nan_midway_is_reported_loudly(tokenizer, corpus):
    model = make_model("llama", vocab=len(tokenizer))
    with torch.no_grad():  # block 1's normalised inputs blow up (finite weights): its statistics become inf
        model.model.layers[1].input_layernorm.weight.fill_(3e38)
    with pytest.raises(NonFiniteStatisticsError, match=r"NaN/inf in the .* of model.layers.1.*already pruned in place"):
        Pruner(model, tokenizer).prune(WandaConfig(calibration=CAL), calibration_dataset=corpus[:200],
                                       progress=False)


def test_output_dir_errors_and_no_partial_folder(tokenizer, corpus, tmp_path, monkeypatch):
    model = make_model("llama", vocab=len(tokenizer))
    pruner = Pruner(model, tokenizer)
    with pytest.raises(ValueError, match="nothing was pruned yet"):
        pruner.save_pretrained(tmp_path / "out")
    pruner.prune(MagnitudeConfig(), progress=False)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputDirError, match="is a file, not a folder"):
        pruner.save_pretrained(afile)
    with pytest.raises(OutputDirError, match="is a file"):
        pruner.save_pretrained(afile / "sub")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        pruner.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # no output folder, no temporary folder

    monkeypatch.undo()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    with pytest.raises(OutputDirError, match=r"did not write \(stale.txt\)"):  # never deleted, overwrite or not
        pruner.save_pretrained(tmp_path / "out", overwrite=True)
    assert os.listdir(tmp_path / "out") == ["stale.txt"]
    assert sorted(os.listdir(tmp_path)) == ["afile", "out"]


def _unchanged_nan(model, snap):
    return all(torch.equal(v, snap[k]) or torch.allclose(v, snap[k], rtol=0, atol=0, equal_nan=True)
               for k, v in model.state_dict().items())


def test_non_finite_weights_rejected_upfront(tokenizer):
    model = make_model("llama", vocab=len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(NonFiniteWeightsError, match=r"^model.layers.1.mlp.up_proj.weight \(torch.float32\) holds 1 "
                       r"NaN/inf of its 8192 values; the checkpoint is corrupt or overflowed when loaded. Nothing was "
                       r"changed.$"):
        Pruner(model, tokenizer).prune(MagnitudeConfig(), progress=False)
    assert _unchanged_nan(model, snap)


@pytest.mark.parametrize("dtype,hint", [(torch.float32, ""), (torch.float16, " (try dtype=torch.float32)"),
                                        (torch.bfloat16, " (try dtype=torch.float32)")])
@pytest.mark.parametrize("config_class", [WandaConfig, SparseGPTConfig, ECoFLaPConfig])
def test_nan_outside_the_targets_is_refused_before_any_change(tokenizer, corpus, config_class, dtype, hint):
    """A NaN in a weight on the forward path that no method prunes (a norm) is found before the first block is
    pruned, named with its true dtype; half precision is suggested as the cause only for half precision."""
    model = make_model("llama", vocab=len(tokenizer)).to(dtype)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = float("nan")
    snap = snapshot(model)
    with pytest.raises(NonFiniteWeightsError) as info:
        Pruner(model, tokenizer).prune(config_class(calibration=CAL), calibration_dataset=corpus[:200], progress=False)
    assert str(info.value) == (f"model.layers.1.post_attention_layernorm.weight ({dtype}) holds 1 NaN/inf of its 64 "
                               f"values; the checkpoint is corrupt or overflowed when loaded{hint}. Nothing was "
                               "changed.")
    assert _unchanged_nan(model, snap)


def test_nan_in_a_buffer_is_refused_but_an_infinite_one_is_not(tokenizer):
    model = make_model("llama", vocab=len(tokenizer))
    rotary = model.model.rotary_emb
    with torch.no_grad():
        rotary.inv_freq[0] = float("inf")  # a buffer may hold inf legitimately (a mask): not refused
    Pruner(model, tokenizer).prune(MagnitudeConfig(), progress=False)
    model = make_model("llama", vocab=len(tokenizer))
    with torch.no_grad():
        model.model.rotary_emb.inv_freq[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"^model.rotary_emb.inv_freq \(torch.float32\) holds 1 NaN/inf"):
        Pruner(model, tokenizer).prune(MagnitudeConfig(), progress=False)


def test_stats_error_when_block_sees_only_padding(tokenizer, corpus):
    model = make_model("bert", vocab=len(tokenizer))
    batches = make_batches("bert", tokenizer, corpus, n=4, batch=4)
    for b in batches:
        b["attention_mask"] = torch.zeros_like(b["attention_mask"])
    snap = snapshot(model)
    with pytest.raises(NonFiniteStatisticsError, match="saw no real \\(non-padding\\) token"):
        Pruner(model, tokenizer).prune(SparseGPTConfig(calibration=CAL), calibration_dataset=batches, progress=False)
    assert unchanged(model, snap)
