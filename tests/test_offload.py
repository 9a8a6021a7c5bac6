"""Bigger than memory: models loaded with accelerate CPU/disk offload prune to exactly the weights of the same model
pruned in memory, a forward pass and save_pretrained see them, and the checkpoint on disk is never written to."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as T
from conftest import make_model

from hf_prune import CalibrationConfig, MagnitudeConfig, Pruner, SparseGPTConfig, WandaConfig
from hf_prune.engine.offload import iter_tensors, offloaded_tensors
from hf_prune.errors import OffloadError

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
              "model.layers.1": "cpu", "model.norm": "disk", "lm_head": "disk"}
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


def _config(method: str):
    cal = CalibrationConfig(num_samples=4, seq_len=32, seed=0)
    return {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}[method](
        sparsity=0.5, calibration=cal)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _in_memory(checkpoint, tokenizer, corpus, method):
    model = T.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    Pruner(model, tokenizer).prune(_config(method), calibration_dataset=corpus[:200], progress=False)
    return model


def _same_weights(model, reference) -> list[str]:
    want = dict(reference.named_parameters())
    return [name for name, value in iter_tensors(model) if not torch.equal(value, want[name])]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_disk_and_cpu_offload_prune_bit_identical(method, checkpoint, tokenizer, corpus, tmp_path):
    reference = _in_memory(checkpoint, tokenizer, corpus, method)
    original = {k: v.clone() for k, v in T.LlamaForCausalLM.from_pretrained(checkpoint).state_dict().items()}
    pruner = Pruner.from_pretrained(checkpoint, dtype=torch.float32, device_map=DEVICE_MAP,
                                    offload_folder=str(tmp_path / "offload"))
    held = offloaded_tensors(pruner.model)
    assert "model.layers.0.mlp.down_proj.weight" in held and "model.layers.1.mlp.down_proj.weight" not in held
    assert pruner.model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    result = pruner.prune(_config(method), calibration_dataset=corpus[:200], progress=False)

    assert pruner.model.model.layers[0].mlp.down_proj.weight.device.type == "meta"  # released after the block
    assert _same_weights(pruner.model, reference) == []
    assert result.report["sparsity"]["overall"]["achieved"] == pytest.approx(0.5)
    assert result.report["model"]["offload"]["offloaded_tensors"]["disk"] == 11  # layer 0 (9), norm, lm_head
    with torch.no_grad():  # the hooks' own forward reads the pruned weights back from the offload folder
        assert torch.equal(pruner.model(IDS).logits, reference(IDS).logits)
    assert os.path.isfile(tmp_path / "offload" / "model.layers.0.mlp.down_proj.weight.dat")

    saved = pruner.save_pretrained(tmp_path / "out")
    reloaded = T.LlamaForCausalLM.from_pretrained(saved, dtype=torch.float32)
    assert _same_weights(reloaded, reference) == []
    untouched = T.LlamaForCausalLM.from_pretrained(checkpoint).state_dict()  # the source checkpoint is never written
    assert all(torch.equal(untouched[k], v) for k, v in original.items())


def test_max_memory_auto_map_spills_to_disk(checkpoint, tokenizer, corpus, tmp_path):
    """device_map='auto' with a CPU budget smaller than the model: accelerate puts the rest on disk."""
    reference = _in_memory(checkpoint, tokenizer, corpus, "wanda")
    size = sum(p.numel() * 4 for p in reference.parameters())
    pruner = Pruner.from_pretrained(checkpoint, dtype=torch.float32, device_map="auto",
                                    max_memory={"cpu": size // 3}, offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(pruner.model.hf_device_map.values())
    pruner.prune(_config("wanda"), calibration_dataset=corpus[:200], progress=False)
    assert _same_weights(pruner.model, reference) == []


def test_accelerate_cpu_offload_dict_and_save(checkpoint, tokenizer, corpus, tmp_path):
    """accelerate.cpu_offload keeps every weight in a CPU dict (no hf_device_map): written back there and saved."""
    from accelerate import cpu_offload

    reference = _in_memory(checkpoint, tokenizer, corpus, "magnitude")
    model = cpu_offload(T.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                        execution_device=torch.device("cpu"))
    assert all(p.device.type == "meta" for p in model.parameters())
    pruner = Pruner(model, tokenizer)
    pruner.prune(_config("magnitude"), progress=False)
    assert _same_weights(model, reference) == []
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)
    reloaded = T.LlamaForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out"), dtype=torch.float32)
    assert _same_weights(reloaded, reference) == []


def test_meta_weights_without_a_map_are_refused(tokenizer, corpus):
    with torch.device("meta"):
        model = make_model("llama", vocab=len(tokenizer))
    with pytest.raises(OffloadError, match="'meta' device without an accelerate weights map"):
        Pruner(model, tokenizer).prune(_config("wanda"), calibration_dataset=corpus[:200], progress=False)


def test_offloaded_model_with_a_whole_model_method_is_refused_untouched(checkpoint, tokenizer, corpus, tmp_path):
    from hf_prune import ECoFLaPConfig

    pruner = Pruner.from_pretrained(checkpoint, dtype=torch.float32, device_map=DEVICE_MAP,
                                    offload_folder=str(tmp_path / "offload"))
    before = {n: t.clone() for n, t in iter_tensors(pruner.model)}
    with pytest.raises(OffloadError, match="prune offloaded models with magnitude, wanda, sparsegpt, ria"):
        pruner.prune(ECoFLaPConfig(sparsity=0.5), calibration_dataset=corpus[:200], progress=False)
    assert all(torch.equal(t, before[n]) for n, t in iter_tensors(pruner.model))


def test_resume_restores_into_the_offload_maps(checkpoint, tokenizer, corpus, tmp_path):
    """A resumed offloaded run writes the checkpointed blocks into the weights maps, not onto meta tensors."""
    reference = _in_memory(checkpoint, tokenizer, corpus, "wanda")
    folder = tmp_path / "ckpt"
    first = Pruner.from_pretrained(checkpoint, dtype=torch.float32, device_map=DEVICE_MAP,
                                   offload_folder=str(tmp_path / "offload1"))
    first.prune(_config("wanda"), calibration_dataset=corpus[:200], checkpoint_dir=folder, progress=False)
    again = Pruner.from_pretrained(checkpoint, dtype=torch.float32, device_map=DEVICE_MAP,
                                   offload_folder=str(tmp_path / "offload2"))
    again.prune(_config("wanda"), calibration_dataset=corpus[:200], checkpoint_dir=folder, resume=True,
                progress=False)
    assert again.model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    assert _same_weights(again.model, reference) == []
