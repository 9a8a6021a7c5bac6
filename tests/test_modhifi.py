"""ModHiFi pruning end to end: physically smaller models that reload with stock classes and match, redundancy
removed for free, compensation that helps on a real trained model, the data-free path, the report, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from conftest import FAMILIES, make_batches, make_model

from hf_prune import CalibrationConfig, ModHiFiConfig, Pruner, PrunerConfig
from hf_prune.cli import main
from hf_prune.demo import sentence_embeddings
from hf_prune.errors import CalibrationDataError, UnsupportedModelError
from hf_prune.structured import mlp_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _out(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _out_all(model, batch):
    if isinstance(model, T.CLIPModel):
        model.eval()
        with torch.no_grad():
            out = model(**batch)
        return torch.cat([out.text_embeds.flatten(), out.image_embeds.flatten()])
    return _out(model, batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_shrunk_model_reloads_with_the_stock_class(family, tokenizer, corpus, tmp_path):
    model = make_model(family, vocab=len(tokenizer))
    batches = make_batches(family, tokenizer, corpus, n=8, batch=4)
    dense_params = _params(model)
    pruner = Pruner(model, tokenizer)
    result = pruner.prune(ModHiFiConfig(sparsity=0.25), calibration_dataset=batches, progress=False)
    assert result.sparsity == pytest.approx(0.25)
    groups = mlp_groups(model)
    assert [g.width for g in groups] == [96] * len(groups)
    s = result.report["structured"]
    assert set(s["config_widths"].values()) == {96} and s["uniform_widths"]
    for group in groups:  # every stage's (sub-)config holds the new width
        assert getattr(group.stage.config(model), group.spec.width_key) == 96
    assert s["parameters"] == {"before": dense_params, "after": _params(model),
                               "removed_fraction": pytest.approx((dense_params - _params(model)) / dense_params)}
    assert s["neurons"]["before"] == 128 * len(groups) and s["neurons"]["after"] == 96 * len(groups)
    assert s["linear_flops_per_token"]["after"] < s["linear_flops_per_token"]["before"]
    for layer in s["layers"].values():  # compensation lowered every layer's reconstruction error
        assert layer["width_after"] == 96 and 0 <= layer["reconstruction_error"] < layer[
            "reconstruction_error_uncompensated"]
    pruner.save_pretrained(tmp_path)
    assert not (tmp_path / "hf_prune_layout.py").exists()
    reloaded = getattr(T, type(model).__name__).from_pretrained(tmp_path)
    assert _params(reloaded) == _params(model) < dense_params
    torch.testing.assert_close(_out_all(reloaded, batches[0]), _out_all(model, batches[0]), rtol=0, atol=0)
    config = PrunerConfig.from_pretrained(tmp_path)
    assert isinstance(config, ModHiFiConfig) and config.sparsity == 0.25
    card = (tmp_path / "README.md").read_text()
    assert f"ModHiFi removed {32 * len(groups)} of {128 * len(groups)} MLP hidden neurons" in card
    assert "physically smaller" in card and f'{type(model).__name__}.from_pretrained("path/to' in card
    # the card shows what was removed (widths, weights, FLOPs per block), not the zeros left in smaller tensors
    assert "## What was removed" in card and "## Achieved sparsity" not in card
    down = next(iter(s["layers"].values()))["output"]  # the MLP's output Linear: it lost input columns
    block = max((b for b in result.report["sparsity"]["per_block"] if down.startswith(b + ".")), key=len)
    out_f = result.report["sparsity"]["per_module"][down]["shape"][0]
    assert f"`{down[len(block) + 1:]}` {out_f}×128 → {out_f}×96" in card
    row = next(line for line in card.splitlines() if line.startswith(f"| `{block}` |"))
    assert "| 25.00% |" in row  # a quarter of every MLP weight: 32 of 128 neurons
    assert f"All parameters: {dense_params:,} → {_params(model):,}" in card
    assert "| **overall** |" in card and "| 0.0000 |" not in card.split("## What was removed")[1].split("##")[0]


@pytest.mark.parametrize("selection", ["global_ratio", "per_output_union"])
def test_non_uniform_widths_reload_through_the_layout(selection, tokenizer, corpus, tmp_path):
    model = make_model("llama", vocab=len(tokenizer))
    batches = make_batches("llama", tokenizer, corpus, n=8, batch=4)
    if selection == "per_output_union":  # a redundant block 0: half its neurons feed no output at all
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[:, 64:] = 0
    config = ModHiFiConfig(sparsity=0.3 if selection == "global_ratio" else 0.5, selection=selection,
                           score="saliency" if selection == "global_ratio" else "singleton_fidelity")
    result = Pruner(model, tokenizer).prune(config, calibration_dataset=batches, progress=False)
    widths = [g.width for g in mlp_groups(model)]
    if selection == "global_ratio":  # one budget for the stage, spent unevenly
        assert sum(widths) == 256 - round(0.3 * 256) and len(set(widths)) == 2
    else:  # the union keeps what some output needs: block 0's dead half goes, block 1 keeps all
        assert widths == [64, 128]
    assert result.report["structured"]["config_widths"] == {"decoder": None}
    pruner = Pruner(model, tokenizer)
    pruner.results.append(result)
    pruner.save_pretrained(tmp_path)
    assert (tmp_path / "hf_prune_layout.py").exists()
    card = (tmp_path / "README.md").read_text()  # the card shows the loading code that works
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)' in card
    with pytest.raises(Exception):
        T.LlamaForCausalLM.from_pretrained(tmp_path)  # the stock config cannot describe it...
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)  # ...the layout does
    torch.testing.assert_close(_out(loaded, batches[0]), _out(model, batches[0]), rtol=0, atol=0)


def test_duplicated_neurons_are_removed_with_near_zero_error(tokenizer, corpus):
    """An MLP whose second half duplicates its first: removing half the neurons by the (compensated) fidelity
    greedy takes one copy of each pair, and the compensation folds it into its twin."""
    model = make_model("opt", vocab=len(tokenizer))
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.fc1.weight[64:] = layer.fc1.weight[:64]
            layer.fc1.bias[64:] = layer.fc1.bias[:64]
    batches = make_batches("opt", tokenizer, corpus, n=8, batch=4)
    dense = _out(model, batches[0])
    errors = {}
    for score in ("greedy_fidelity", "singleton_fidelity"):
        pruned = make_model("opt", vocab=len(tokenizer))
        pruned.load_state_dict(model.state_dict())
        result = Pruner(pruned).prune(ModHiFiConfig(sparsity=0.5, score=score, damp=1e-6),
                                      calibration_dataset=batches, progress=False)
        errors[score] = float((_out(pruned, batches[0]) - dense).norm() / dense.norm())
        if score == "greedy_fidelity":
            for layer in pruned.model.decoder.layers:
                assert layer.fc1.out_features == 64
            for entry in result.report["structured"]["layers"].values():
                assert entry["reconstruction_error"] < 1e-8
    assert errors["greedy_fidelity"] < 1e-5
    # singleton scores cannot see redundancy (a twin scores as high as its copy): whole pairs go
    assert errors["singleton_fidelity"] > 1e3 * errors["greedy_fidelity"]


def test_compensation_and_fidelity_beat_no_compensation_and_l2_on_real_minilm(minilm_path, heldout):
    """On the trained all-MiniLM-L6-v2 with 30% of its MLP neurons removed: the least-squares compensation keeps
    the sentence embeddings closer to the dense model's than no compensation, and ModHiFi beats the L2
    structured baseline at the same widths."""
    import copy

    sentences = heldout[:48]
    dense = Pruner.from_pretrained(minilm_path, dtype=torch.float32)
    reference = sentence_embeddings(dense.model, dense.tokenizer, sentences)
    cal = CalibrationConfig(num_samples=24, seq_len=64, packing="pad", batch_size=12)

    def cosine(**kwargs) -> float:
        pruner = Pruner(copy.deepcopy(dense.model), dense.tokenizer)
        result = pruner.prune(ModHiFiConfig(sparsity=0.3, calibration=cal, **kwargs),
                              calibration_dataset="builtin:python-docs", progress=False)
        assert [g.width for g in mlp_groups(pruner.model)] == [1075] * 6
        layers = result.report["structured"]["layers"].values()
        if kwargs.get("compensation") != "none":
            assert all(e["reconstruction_error"] < 0.7 * e["reconstruction_error_uncompensated"] for e in layers)
        return float((sentence_embeddings(pruner.model, pruner.tokenizer, sentences) * reference).sum(-1).mean())

    modhifi = cosine()
    uncompensated = cosine(compensation="none")
    l2 = cosine(score="l2_norm", compensation="none")
    assert modhifi > uncompensated + 0.03 and modhifi > l2 + 0.05, (modhifi, uncompensated, l2)


def test_data_free_path_samples_from_the_model(tokenizer):
    model = make_model("llama", vocab=len(tokenizer))
    config = ModHiFiConfig(sparsity=0.25,
                           calibration=CalibrationConfig(num_samples=4, seq_len=16, batch_size=2, seed=3))
    result = Pruner(model, tokenizer).prune(config, progress=False)
    cal = result.report["calibration"]
    assert cal["source"] == "self-generated" and cal["seed"] == 3 and cal["real_tokens"] == 64
    assert [g.width for g in mlp_groups(model)] == [96, 96]
    from hf_prune.calibration.synthetic import sample_sequences

    state = torch.random.get_rng_state()
    fresh = make_model("llama", vocab=len(tokenizer))
    a = sample_sequences(fresh, num_samples=3, seq_len=10, batch_size=2, seed=1)
    b = sample_sequences(fresh, num_samples=3, seq_len=10, batch_size=2, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert [x["input_ids"].tolist() for x in a.batches] == [x["input_ids"].tolist() for x in b.batches]
    assert a.batches[0]["input_ids"].shape == (2, 10) and bool((a.batches[0]["input_ids"][:, 0] == 1).all())
    # encoders have no data-free path: a clear error, and the model is untouched
    bert = make_model("bert", vocab=len(tokenizer))
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.raises(CalibrationDataError, match="needs a causal language model"):
        Pruner(bert, tokenizer).prune(ModHiFiConfig(), progress=False)
    assert all(torch.equal(v, bert.state_dict()[k]) for k, v in before.items())
    # ... except the L2 baseline, which reads no activations
    result = Pruner(bert, tokenizer).prune(ModHiFiConfig(score="l2_norm", compensation="none"), progress=False)
    assert result.report["calibration"]["source"] is None and [g.width for g in mlp_groups(bert)] == [102, 102]


def test_iterations_and_summary(tokenizer, corpus):
    model = make_model("llama", vocab=len(tokenizer))
    batches = make_batches("llama", tokenizer, corpus, n=8, batch=4)
    result = Pruner(model, tokenizer).prune(ModHiFiConfig(sparsity=0.5, num_iterations=2, score="greedy_fidelity"),
                                            calibration_dataset=batches, progress=False)
    layer = result.report["structured"]["layers"]["model.layers.0"]
    assert [(s["width_before"], s["width_after"]) for s in layer["steps"]] == [(128, 96), (96, 64)]
    text = result.summary()
    assert "128 -> 64" in text and "parameters" in text and "1 - fidelity" in text
    json.dumps(result.report)  # JSON-ready


@pytest.mark.parametrize("kwargs,words", [
    (dict(sparsity=1.0), "sparsity=1.0 must be a number in [0.0, 1.0)"),
    (dict(score="taylor"), "score='taylor' is not supported"),
    (dict(selection="per_output_union", score="greedy_fidelity"), "has no per-output form|cannot"),
    (dict(forget_data=[{"x": torch.ones(1)}]), "only read with mode='unlearn'"),
    (dict(mode="unlearn"), "needs forget_data"),
    (dict(unit="heads"), "unit='heads' is not supported"),
    (dict(damp=0), "damp=0 must be a number in (0.0, 100.0]"),
])
def test_bad_configs_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                       if "|" not in words else words):
        ModHiFiConfig(**kwargs)


def test_bad_inputs_fail_before_any_weight_changes(tokenizer, corpus):
    model = make_model("opt", vocab=len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="would remove all 128 neurons"):
        Pruner(model, tokenizer).prune(ModHiFiConfig(sparsity=0.999), calibration_dataset=corpus, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    resnet = T.ResNetForImageClassification(T.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8],
                                                           depths=[1], layer_type="basic", num_labels=3))
    with pytest.raises(UnsupportedModelError, match="mode='unlearn' works on it"):
        Pruner(resnet).prune(ModHiFiConfig(), progress=False)


def test_cli_prunes_with_modhifi(tmp_path, tokenizer, capsys):
    src = tmp_path / "tiny-llama"
    make_model("llama", vocab=len(tokenizer)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "pruned"
    code = main(["prune", str(src), "--method", "modhifi", "--sparsity", "0.25", "--score", "saliency",
                 "--calibration", "builtin:python-docs", "--num-samples", "8", "--seq-len", "32", "--output", str(out),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "128 -> 96" in printed and "saved to" in printed
    model = T.LlamaForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 96 and model.model.layers[1].mlp.down_proj.in_features == 96
    assert json.loads((out / "pruning_config.json").read_text())["score"] == "saliency"
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "match the report" in printed and "ModHiFi removed 64 of 256 MLP hidden neurons" in printed
    assert main(["prune", str(src), "--method", "modhifi", "--selection", "everything", "--output",
                 str(tmp_path / "x")]) == 2
    assert "selection='everything' is not supported" in capsys.readouterr().err
