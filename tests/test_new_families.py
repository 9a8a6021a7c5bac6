"""Families found by generic discovery work everywhere LLaMA does: accelerate offload, resumable runs, the CLI
(prune and plan) and its card; ECoFLaP, ModHiFi and SPP wherever the family table says they serve the family."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from conftest import make_batches, make_model

from hf_prune import CalibrationConfig, ECoFLaPConfig, ModHiFiConfig, Pruner, SparseGPTConfig, SPPConfig, WandaConfig
from hf_prune.cli import main
from hf_prune.engine.offload import iter_tensors, offloaded_tensors
from hf_prune.models.discovery import decoder_inputs
from hf_prune.planner import plan

CAL = CalibrationConfig(num_samples=8)


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**decoder_inputs(model, batch))
    for key in ("logits_per_image", "logits", "last_hidden_state"):
        if torch.is_tensor(getattr(out, key, None)):
            return getattr(out, key)
    raise AssertionError(type(out))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """family -> a folder holding its tiny model (and the tokenizer)."""
    out = {}
    for family in ("gpt2", "roberta", "mixtral"):
        folder = tmp_path_factory.mktemp(family)
        make_model(family, vocab=len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[family] = folder
    return out


OFFLOAD = {  # half of each model's blocks on disk, half in CPU weights maps; everything else on disk or cpu
    "gpt2": ({"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "disk", "transformer.h.1": "cpu",
              "transformer.ln_f": "cpu", "lm_head": "cpu"}, "transformer.h.0.attn.c_attn.weight"),
    "roberta": ({"embeddings": "cpu", "encoder.layer.0": "disk", "encoder.layer.1": "cpu", "pooler": "cpu"},
                "encoder.layer.0.attention.self.query.weight"),
    "mixtral": ({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                 "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"},
                "model.layers.0.mlp.experts.gate_up_proj"),
}


@pytest.mark.parametrize("family", ["gpt2", "roberta", "mixtral"])
def test_offloaded_new_family_prunes_bit_identical(family, saved, tokenizer, corpus, tmp_path):
    batches = make_batches(family, tokenizer, corpus)
    config = WandaConfig(pattern="2:4", calibration=CAL)
    cls = getattr(T, type(make_model(family, vocab=len(tokenizer))).__name__)
    reference = cls.from_pretrained(saved[family], dtype=torch.float32)
    Pruner(reference, tokenizer).prune(config, calibration_dataset=batches, progress=False)
    device_map, held_name = OFFLOAD[family]
    pruner = Pruner(cls.from_pretrained(saved[family], dtype=torch.float32, device_map=device_map,
                                        offload_folder=str(tmp_path / "offload")), tokenizer)
    assert held_name in offloaded_tensors(pruner.model)
    pruner.prune(config, calibration_dataset=batches, progress=False)
    want = dict(reference.named_parameters())
    assert [n for n, v in iter_tensors(pruner.model) if not torch.equal(v, want[n])] == []


@pytest.mark.parametrize("family", ["gpt2", "roberta", "mixtral"])
def test_interrupted_new_family_resumes_bit_identical(family, tokenizer, corpus, tmp_path, monkeypatch):
    """A run stopped after block 1 (the checkpoint hook raises there) resumes to the uninterrupted weights."""
    from hf_prune.engine import checkpoint as checkpointing

    batches = make_batches(family, tokenizer, corpus)
    config = SparseGPTConfig(pattern="2:4", calibration=CAL)
    full = make_model(family, vocab=len(tokenizer))
    Pruner(full, tokenizer).prune(config, calibration_dataset=batches, progress=False)

    class Stop(Exception):
        pass

    done = checkpointing.RunCheckpoint.block_done

    def stop_after_first(self, *args, **kwargs):
        done(self, *args, **kwargs)
        raise Stop

    model = make_model(family, vocab=len(tokenizer))
    monkeypatch.setattr(checkpointing.RunCheckpoint, "block_done", stop_after_first)
    with pytest.raises(Stop):
        Pruner(model, tokenizer).prune(config, calibration_dataset=batches, progress=False,
                                       checkpoint_dir=tmp_path / "ckpt")
    monkeypatch.setattr(checkpointing.RunCheckpoint, "block_done", done)
    resumed = make_model(family, vocab=len(tokenizer))
    result = Pruner(resumed, tokenizer).prune(config, calibration_dataset=batches, progress=False,
                                              checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert result.report["run"]["checkpoint"]["resumed_after"] is not None
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["gpt2", "roberta"])
def test_cli_prunes_plans_and_cards_a_new_family(family, saved, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(saved[family]), "--method", "wanda", "--pattern", "2:4", "--calibration",
                 "builtin:python-docs", "--num-samples", "4", "--seq-len", "32", "--no-progress",
                 "--output", str(out)]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["sparsity"]["overall"]["achieved"] == pytest.approx(0.5) and report["model"]["family"] == family
    card = (out / "README.md").read_text()
    assert f"pipeline_tag: {'text-generation' if family == 'gpt2' else 'feature-extraction'}" in card
    cls = getattr(T, json.loads((out / "config.json").read_text())["architectures"][0])
    reloaded = cls.from_pretrained(out)
    assert sum(int((p == 0).sum()) for p in reloaded.parameters()) >= report["sparsity"]["overall"]["zeros"]
    capsys.readouterr()
    estimate = plan(str(saved[family]), method="sparsegpt", num_samples=8, seq_len=32)
    assert estimate.stages and estimate.host_peak > 0 and estimate.flops > 0


@pytest.mark.parametrize("family,config", [
    ("gpt2", ECoFLaPConfig(sparsity=0.5, num_score_samples=4, calibration=CAL)),       # Conv1D
    ("mixtral", ECoFLaPConfig(sparsity=0.5, num_score_samples=4, calibration=CAL)),    # experts
    ("t5", ECoFLaPConfig(sparsity=0.5, num_score_samples=4, calibration=CAL)),         # seq2seq loss
    ("llava", ECoFLaPConfig(sparsity=0.5, num_score_samples=4, calibration=CAL)),      # one budget per tower
    ("gemma2", ModHiFiConfig(sparsity=0.25, calibration=CAL)),                         # tp-plan MLP spec
    ("gpt_neox", ModHiFiConfig(sparsity=0.25, calibration=CAL)),
    ("qwen2_vl", ModHiFiConfig(sparsity=0.25, calibration=CAL)),
    ("whisper", SPPConfig(sparsity=0.5, training_free=True, calibration=CAL)),
    ("swin", SPPConfig(sparsity=0.5, training_free=True, calibration=CAL)),
])
def test_other_methods_on_new_families_save_and_reload_stock(family, config, tokenizer, corpus, tmp_path):
    model = make_model(family, vocab=len(tokenizer))
    batches = make_batches(family, tokenizer, corpus)
    pruner = Pruner(model, tokenizer)
    result = pruner.prune(config, calibration_dataset=batches, progress=False)
    if isinstance(config, ModHiFiConfig):  # neurons removed: the stock class with a smaller width reloads
        neurons = result.report["structured"]["neurons"]
        assert neurons["after"] < neurons["before"] and result.report["structured"]["uniform_widths"]
    else:
        assert result.report["sparsity"]["overall"]["achieved"] == pytest.approx(0.5, abs=0.01)
    if family == "llava":
        budgets = {e["stage"] for e in result.report["allocation"]["groups"].values()}
        assert budgets == {"vision_tower", "language_model"}
    pruner.save_pretrained(tmp_path / "out")
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    reloaded = type(model).from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_outputs(reloaded, batches[0]), _outputs(model, batches[0]), rtol=0, atol=0)
