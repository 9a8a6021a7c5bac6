"""Every method x pattern on every supported family: exact achieved sparsity, N:M in every group,
only the blocks' Linears touched, and save -> stock reload -> identical outputs."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers as T
from conftest import MATRIX, make_batches, make_model

from hf_prune import CalibrationConfig, Pruner, SparseGPTConfig
from hf_prune.engine.targets import target_weight
from hf_prune.models.discovery import decoder_inputs
from hf_prune.patterns import nm_violations, prune_count
from hf_prune.registry import method_specs

METHODS = tuple(spec.config_class for spec in method_specs() if spec.layerwise)  # every registered layer-wise pruner
PATTERNS = ("unstructured", "2:4", "4:8")


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**decoder_inputs(model, batch))  # an encoder-decoder gets its decoder inputs
    if getattr(out, "logits_per_image", None) is not None:  # two towers (CLIP, SigLIP)
        return torch.cat([out.logits_per_image.flatten(), out.text_embeds.flatten(), out.image_embeds.flatten()])
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.last_hidden_state


def test_the_matrix_covers_every_layerwise_method():
    assert {c.method for c in METHODS} >= {"magnitude", "wanda", "sparsegpt", "ria"}


@pytest.mark.parametrize("family,config_cls,pattern", list(itertools.product(MATRIX, METHODS, PATTERNS)))
def test_every_method_pattern_family(family, config_cls, pattern, tokenizer, corpus):
    model = make_model(family, vocab=len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = make_batches(family, tokenizer, corpus)
    pruner = Pruner(model, tokenizer)
    config = config_cls(pattern=pattern, calibration=CalibrationConfig(num_samples=8))
    result = pruner.prune(config, calibration_dataset=batches, progress=False)

    per_module = result.report["sparsity"]["per_module"]
    linears_in_blocks = result.report["sparsity"]["overall"]["modules"]
    assert linears_in_blocks == len(per_module) > 0
    for name, entry in per_module.items():
        weight = target_weight(model, name)  # [out, in]: a Conv1D's transposed view, an expert's fused slice
        out_f, in_f = weight.shape
        if pattern == "unstructured":
            if getattr(config, "scope", "matrix") == "row":  # Wanda: every row loses exactly its share
                assert torch.all((weight == 0).sum(1) == prune_count(in_f, 0.5)), name
            else:  # one budget per matrix (Magnitude, RIA) or per column block summing exactly (SparseGPT)
                assert entry["zeros"] == prune_count(weight.numel(), 0.5), name
        else:
            n, m = map(int, pattern.split(":"))
            assert nm_violations(weight, n, m) == 0, name
            assert entry["zeros"] == weight.numel() // 2, name
            assert entry["nm_violations"] == 0
    # nothing outside the pruned Linears (and experts) changed; every expert of every fused experts module pruned
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        experts = [n for n in per_module if n.startswith(f"{module}.") and n.endswith("." + name.rsplit(".", 1)[1])]
        if param.dim() == 3 and name.endswith(("gate_up_proj", "down_proj")):
            assert len(experts) == param.shape[0], f"{name}: {len(experts)} of its {param.shape[0]} experts pruned"
        elif module not in per_module or not name.endswith("weight"):
            assert torch.equal(param, before[name]), f"{name} changed but was not a pruning target"


@pytest.mark.parametrize("family", MATRIX)
def test_save_and_stock_reload_identical(family, tokenizer, corpus, tmp_path):
    model = make_model(family, vocab=len(tokenizer))
    batches = make_batches(family, tokenizer, corpus)
    pruner = Pruner(model, tokenizer)
    pruner.prune(SparseGPTConfig(pattern="2:4", calibration=CalibrationConfig(num_samples=8)),
                 calibration_dataset=batches, progress=False)
    out = tmp_path / "pruned"
    pruner.save_pretrained(out)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "pruning_config.json", "pruning_report.json", "README.md"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    reloaded = getattr(T, type(model).__name__).from_pretrained(out)
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(_outputs(model, batches[0]), _outputs(reloaded, batches[0]))
    if family in ("llama", "opt", "bert"):
        assert T.AutoTokenizer.from_pretrained(out)("a test")["input_ids"] == tokenizer("a test")["input_ids"]
