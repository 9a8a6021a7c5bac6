"""ModHiFi-U on classifiers trained inside the test on scikit-learn's bundled digits (real data, offline)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from sklearn.datasets import load_digits

from hf_prune import ModHiFiConfig, Pruner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    X = torch.tensor(X, dtype=torch.float32)[order].view(-1, 1, 8, 8) / 16.0 - 0.5
    y = torch.tensor(y)[order]
    return X[:1400], y[:1400], X[1400:], y[1400:]


@pytest.fixture(scope="module")
def resnet(digits):
    """A small ResNet (conv + BatchNorm) trained for a few seconds on the digits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    X, y, X_test, y_test = digits
    torch.manual_seed(0)
    model = T.ResNetForImageClassification(T.ResNetConfig(
        num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10,
        downsample_in_first_stage=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(300):
        idx = torch.randint(len(y), (64,), generator=g)
        model(pixel_values=X[idx], labels=y[idx]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    torch.set_num_threads(previous)
    return model


def _accuracy(model, X, y, forget):
    with torch.no_grad():
        pred = model(pixel_values=X).logits.argmax(-1)
    keep = y != forget
    return float((pred[~keep] == forget).double().mean()), float((pred[keep] == y[keep]).double().mean())


def test_unlearning_one_class_of_a_trained_resnet(digits, resnet):
    X, y, X_test, y_test = digits
    dense = [_accuracy(resnet, X_test, y_test, c) for c in range(10)]
    assert min(f for f, _ in dense) > 0.85 and min(r for _, r in dense) > 0.9  # the classifier works

    def unlearn(forget_class, with_remain):
        model = copy.deepcopy(resnet)
        forget = [{"pixel_values": X[y == forget_class][:64], "labels": y[y == forget_class][:64]}]
        remain = [{"pixel_values": X[y != forget_class][:256], "labels": y[y != forget_class][:256]}]
        result = Pruner(model).prune(ModHiFiConfig(mode="unlearn", forget_data=forget, unlearn_fraction=0.05,
                                                   remain_data=remain if with_remain else None), progress=False)
        return model, result

    dense_remain = sum(r for _, r in dense) / 10
    outcome = {}
    for with_remain in (False, True):  # the paper's rule (forget samples only), then ours with the other classes
        after = []
        for c in range(10):  # every class in turn, judged on held-out digits
            model, result = unlearn(c, with_remain)
            u = result.report["unlearning"]
            assert u["forget_class"] == c and u["edit"] == "zero"
            assert (u["before"]["remain_accuracy"] is not None) == with_remain
            assert u["after"]["forget_accuracy"] < u["before"]["forget_accuracy"]
            after.append(_accuracy(model, X_test, y_test, c))
        outcome[with_remain] = (sum(f for f, _ in after) / 10, dense_remain - sum(r for _, r in after) / 10)
    (paper_forget, paper_drop), (ours_forget, ours_drop) = outcome[False], outcome[True]
    assert paper_forget < 0.35 and paper_drop < 0.15, outcome  # from ~96% forget-class accuracy; chance is 10%
    assert ours_forget < 0.2 and ours_drop < 0.12 and ours_forget < paper_forget, outcome

    # the edit is exact: each output of each conv lost its top 5% kernel slices (zeros), nothing else changed
    conv = "resnet.encoder.stages.1.layers.0.layer.1.convolution"
    layer = u["layers"][conv]
    weight, original = model.get_submodule(conv).weight, resnet.get_submodule(conv).weight
    zeroed = weight.flatten(2).abs().sum(2) == 0
    assert layer["edited"] == layer["outputs"] * layer["edited_per_output"] == int(zeroed.sum()) == 32 * 2
    assert torch.equal(weight[~zeroed], original[~zeroed])
    assert 0 < u["time_s"] < result.report["run"]["time_s"]
    assert "forget_accuracy" in result.summary()


@pytest.mark.parametrize("family", ["vit", "bert"])
def test_layernorm_classifiers_negate_the_selected_components(family, digits):
    """Mechanics on LayerNorm + residual classifiers: exactly the top pairs of each output are negated."""
    X, y, _, _ = digits
    torch.manual_seed(0)
    if family == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32,
                                                        intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, num_labels=10))
        inputs = lambda x: {"pixel_values": x}  # noqa: E731
    else:
        model = T.BertForSequenceClassification(T.BertConfig(vocab_size=20, hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             max_position_embeddings=80, num_labels=10))
        inputs = lambda x: {"input_ids": ((x.flatten(1) + 0.5) * 16).round().long()}  # noqa: E731
    original = copy.deepcopy(model)
    forget = [{**inputs(X[y == 2][:32]), "labels": y[y == 2][:32]}]
    result = Pruner(model).prune(ModHiFiConfig(mode="unlearn", forget_data=forget, unlearn_fraction=0.25,
                                               unlearn_layers=1), progress=False)
    u = result.report["unlearning"]
    assert u["edit"] == "negate" and list(u["layers"]) == [next(n for n in u["layers"])]
    (name, layer), = u["layers"].items()
    assert name.endswith("1.output.dense") or name.endswith("1.mlp.fc2")
    new, old = model.get_submodule(name).weight, original.get_submodule(name).weight
    flipped = (new == -old) & (old != 0)
    assert int(flipped.sum()) == layer["edited"] == 32 * 16 and bool(((new == old) | flipped).all())
    assert all(torch.equal(p, original.state_dict()[k]) for k, p in model.state_dict().items() if name not in k)
    with pytest.raises(ValueError, match=r"holds samples labelled \[1, 2\]"):
        Pruner(copy.deepcopy(original)).prune(ModHiFiConfig(mode="unlearn", forget_data=[
            {**inputs(X[:8]), "labels": torch.tensor([2, 2, 2, 1, 2, 2, 2, 2])}], forget_class=2), progress=False)
    with pytest.raises(ValueError, match="forget_class=12 is not a class of this 10-class model"):
        Pruner(copy.deepcopy(original)).prune(ModHiFiConfig(mode="unlearn", forget_data=forget, forget_class=12),
                                              progress=False)
    with pytest.raises(ValueError, match="unlearn_layers=5 exceeds the 2 editable layers"):
        Pruner(copy.deepcopy(original)).prune(ModHiFiConfig(mode="unlearn", forget_data=forget, unlearn_layers=5),
                                              progress=False)


def test_cli_unlearns_from_labelled_records(tmp_path, tokenizer, corpus, capsys):
    import json

    from hf_prune.cli import main

    src = tmp_path / "bert-classifier"
    torch.manual_seed(0)
    T.BertForSequenceClassification(T.BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_labels=3,
                                                 pad_token_id=3)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in corpus[:12]))
    remain = tmp_path / "remain.jsonl"
    remain.write_text("".join(json.dumps({"text": t, "label": 2 if i % 3 else 0}) + "\n"
                              for i, t in enumerate(corpus[12:36])))
    out = tmp_path / "unlearned"
    code = main(["prune", str(src), "--method", "modhifi", "--mode", "unlearn", "--forget-data", str(forget),
                 "--remain-data", str(remain), "--unlearn-fraction", "0.1", "--seq-len", "32", "--output", str(out),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "forgot class 1 (edit: negate" in printed and "remain_accuracy" in printed
    report = json.loads((out / "pruning_report.json").read_text())
    u = report["unlearning"]
    assert u["forget_samples"] == 12 and u["remain_samples"] == 24 and u["edited_components"] == 2 * 32 * 7
    assert report["calibration"]["forget"]["source"].endswith("forget.jsonl")
    reloaded = T.BertForSequenceClassification.from_pretrained(out)  # same shapes: the stock class loads it
    edited = reloaded.bert.encoder.layer[1].output.dense.weight
    original = T.BertForSequenceClassification.from_pretrained(src).bert.encoder.layer[1].output.dense.weight
    assert int((edited == -original).sum()) == 32 * 7
