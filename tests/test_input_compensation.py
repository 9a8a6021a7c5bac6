"""Input compensation: the pool math against brute force, the wrapper's contracts (starts from the pruned model,
Trainer end to end, masks exact with train_base='retained'), quality on a trained LM, folding, save/reload, push."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from conftest import make_batches, make_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from hf_prune import (
    InputCompensatedModel,
    InputCompensationConfig,
    MagnitudeConfig,
    Pruner,
    PrunerConfig,
    SparseGPTConfig,
    WandaConfig,
)
from hf_prune.atomic import OUTPUT_MANIFEST
from hf_prune.callbacks import InputCompensationCallback
from hf_prune.errors import HFPruneError
from hf_prune.evaluation import perplexity, perplexity_windows
from hf_prune.methods.input_compensation.ops import (
    attention_entropy,
    compensation,
    fold_into_table,
    kd_kl_loss,
    masked_mse,
    pool_flops,
    pool_parameters,
)
from hf_prune.patterns import nm_violations


def _args(tmp_path, steps, lr, batch=8, **extra):
    return TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=lr, logging_steps=max(1, steps // 2), report_to=[],
                             save_strategy=extra.pop("save_strategy", "no"), use_cpu=True, disable_tqdm=True,
                             seed=0, data_seed=0, **extra)


# ------------------------------------------------------------------------------------------------ pure math


def test_pool_math_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q, keys, values = torch.randn(5, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    tau = 1.7
    delta, attn = compensation(q, keys, values, tau, normalize_query=False)
    for i in range(5):
        scores = [sum(float(q[i, d]) * float(keys[j, d]) for d in range(6)) / tau for j in range(4)]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        weights = [w / sum(weights) for w in weights]
        assert attn[i].tolist() == pytest.approx(weights, rel=1e-5)
        mix = [sum(weights[j] * float(values[j, c]) for j in range(4)) for c in range(3)]
        assert delta[i].tolist() == pytest.approx(mix, rel=1e-5, abs=1e-6)
        entropy = -sum(w * math.log(w) for w in weights)
        assert float(attention_entropy(attn[i])) == pytest.approx(entropy, rel=1e-5)
    # the RMS-normalised query is scale-free; V = 0 gives exactly no compensation
    d1, a1 = compensation(q, keys, values, tau)
    d2, a2 = compensation(q * 37.0, keys, values, tau)
    torch.testing.assert_close(a1, a2)
    assert float(compensation(q, keys, torch.zeros(4, 3), tau)[0].abs().max()) == 0.0
    assert float(attention_entropy(torch.full((4,), 0.25))) == pytest.approx(math.log(4))
    # folding adds to every row of the table exactly what the per-token compensation adds
    table = torch.randn(11, 6, generator=g)
    assert torch.equal(fold_into_table(table, keys, torch.zeros(4, 6), tau), table)
    v = torch.randn(4, 6, generator=g)
    torch.testing.assert_close(fold_into_table(table, keys, v, tau, chunk_rows=3), table + compensation(table, keys, v, tau)[0])
    assert pool_parameters(64, 4096, 4096) == 64 * 8192
    assert pool_flops(2, 3, 5, normalize_query=False) == 2 * 2 * 3 + 4 * 2 + 2 * 2 * 5 + 5


def test_losses_against_formulas():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pt, ps = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    per = (pt * (pt.log() - ps.log())).sum(-1)
    expected = (per[0, 0] + per[0, 1] + per[1, 0]) / 3 * 4
    assert float(kd_kl_loss(s, t, 2.0, mask)) == pytest.approx(float(expected), rel=1e-5)
    assert float(kd_kl_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    mse = ((s - t) ** 2).mean(-1)
    assert float(masked_mse(s, t, mask)) == pytest.approx(float((mse[0, 0] + mse[0, 1] + mse[1, 0]) / 3), rel=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        kd_kl_loss(s, t[:, :2])


# ------------------------------------------------------------------------------------------------ config & errors


def test_config_validation_registry_and_pruner_refusal(tokenizer):
    for kwargs, match in [
        (dict(pool_size=0), "pool_size"), (dict(temperature=0), "temperature"), (dict(loss="l1"), "loss"),
        (dict(loss={}), "empty dict"), (dict(loss={"kd_kl": 0.0}), "weight 0"), (dict(loss={"nope": 1.0}), "loss key"),
        (dict(train_base=True), "retained"), (dict(train_base="all"), "train_base"), (dict(inject="tokens"), "inject"),
        (dict(query_pool="max"), "query_pool"), (dict(encoder=""), "encoder"), (dict(kd_temperature=-1), "kd_temp"),
    ]:
        with pytest.raises(ValueError, match=match):
            InputCompensationConfig(**kwargs)
    config = InputCompensationConfig(pool_size=8, loss={"kd_kl": 1.0, "task": 0.25}, train_base="retained")
    back = PrunerConfig.from_dict(json.loads(config.to_json_string()))
    assert isinstance(back, InputCompensationConfig) and back == config
    model = make_model("llama", vocab=len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HFPruneError, match="InputCompensatedModel"):
        Pruner(model, tokenizer).prune(config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_lists_the_method_and_refuses_to_prune_with_it(tokenizer, tmp_path, capsys):
    from hf_prune.cli import main

    model = make_model("llama", vocab=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["prune", str(tmp_path / "model"), "--method", "input_compensation", "--output",
                 str(tmp_path / "out"), "--help-method"]) == 0
    assert "--pool-size" in capsys.readouterr().out
    assert main(["prune", str(tmp_path / "model"), "--method", "input_compensation", "--output",
                 str(tmp_path / "out"), "--pool-size", "8", "--no-progress"]) == 2
    assert "InputCompensatedModel" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_wrapper_refuses_what_cannot_work(tokenizer):
    llama = make_model("llama", vocab=len(tokenizer)).eval()
    with pytest.raises(HFPruneError, match="future tokens"):
        InputCompensatedModel(llama, InputCompensationConfig(query_pool="mean"))
    with pytest.raises(HFPruneError, match="no.*vision tower|has none"):
        InputCompensatedModel(llama, InputCompensationConfig(inject="pixel_values"))
    with pytest.raises(HFPruneError, match="another module"):
        InputCompensatedModel(llama, InputCompensationConfig(encoder="model.layers.0"))
    with pytest.raises(HFPruneError, match="Did you mean model.embed_tokens"):
        InputCompensatedModel(llama, InputCompensationConfig(encoder="model.embed_token"))
    with pytest.raises(ValueError, match="no pruned Linear"):
        InputCompensatedModel(llama, InputCompensationConfig(train_base="retained"))
    with pytest.raises(ValueError, match="dense model"):
        InputCompensatedModel(llama, InputCompensationConfig(), teacher=llama)
    ic = InputCompensatedModel(llama, InputCompensationConfig(pool_size=4))  # kd_kl but no teacher: fine for inference
    ids = torch.randint(6, 500, (2, 9))
    with torch.no_grad():
        assert torch.equal(ic(input_ids=ids).logits, ic.unload()(input_ids=ids).logits)  # V = 0: exactly the base
    ic = InputCompensatedModel(llama, InputCompensationConfig(pool_size=4)).train()
    with pytest.raises(HFPruneError, match="teacher=dense_model"):
        ic(input_ids=ids)
    ic.unload()
    with pytest.raises(HFPruneError, match="unloaded"):
        ic(input_ids=ids)
    bert = make_model("bert", vocab=len(tokenizer)).eval()
    ic = InputCompensatedModel(bert, InputCompensationConfig(query_pool="mean", loss="task"))
    with pytest.raises(HFPruneError, match="whole sequence"):
        ic.merge_and_unload()
    vit = make_model("vit").eval()
    ic = InputCompensatedModel(vit, InputCompensationConfig(loss="task"))
    with pytest.raises(HFPruneError, match="depends on the whole image"):
        ic.merge_and_unload()
    with pytest.raises(HFPruneError, match=r"pixel_values of shape \(3, 32, 32\)"):
        ic(pixel_values=torch.randn(1, 3, 16, 16))
    with pytest.raises(HFPruneError, match="several vectors per image"):
        InputCompensatedModel(vit, InputCompensationConfig(query_pool="none"))


# ------------------------------------------------------------------------------------------------ quality on a trained LM


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory):
    """The toy LLaMA trained on builtin:python-docs, magnitude-pruned at 50%, and an IC pool trained on it
    with Trainer against the dense model (KL on logits)."""
    from datasets import Dataset

    from hf_prune.toy import toy_causal_lm

    root = tmp_path_factory.mktemp("ic_lm")
    # trained here (about 17 s) unless HF_PRUNE_CACHE names a persistent cache that may already hold it
    dense, tok = toy_causal_lm("tiny", cache_dir=None if os.environ.get("HF_PRUNE_CACHE") else str(root / "toy"))
    pruned = copy.deepcopy(dense)
    Pruner(pruned, tok).prune(MagnitudeConfig(sparsity=0.5), progress=False)
    reference = copy.deepcopy(pruned)
    windows, _ = perplexity_windows(tok, "builtin:python-docs", seq_len=64, split="train")
    rows = windows[:384]
    # an extra column the model does not take: Trainer must drop it (the wrapper shows the base's signature)
    data = Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": torch.ones_like(rows).tolist(),
                              "source": ["python-docs"] * len(rows)})
    ic = InputCompensatedModel(pruned, InputCompensationConfig(pool_size=32), teacher=dense)
    trainer = Trainer(model=ic, args=_args(root, steps=48, lr=1e-2, batch=16, lr_scheduler_type="cosine"),
                      train_dataset=data, callbacks=[InputCompensationCallback()])
    trainer.train()
    ic.eval()
    return dense, tok, reference, ic, trainer


def _kl_to_dense(model, dense, windows):
    with torch.no_grad():
        return float(kd_kl_loss(model(input_ids=windows).logits, dense(input_ids=windows).logits))


def test_ic_training_lowers_heldout_perplexity_and_kl(trained_lm):
    dense, tok, pruned, ic, trainer = trained_lm
    heldout, _ = perplexity_windows(tok, "builtin:python-docs", seq_len=64, split="test")
    heldout = heldout[:32]

    def ppl(model):
        return perplexity(model, tok, "builtin:python-docs", seq_len=64, max_windows=32, batch_size=8)

    dense_ppl, pruned_ppl, ic_ppl = ppl(dense), ppl(pruned), ppl(ic)
    pruned_kl, ic_kl = _kl_to_dense(pruned, dense, heldout), _kl_to_dense(ic, dense, heldout)
    print(f"held-out perplexity: dense {dense_ppl:.3f} pruned {pruned_ppl:.3f} pruned+IC {ic_ppl:.3f}; "
          f"KL to dense: {pruned_kl:.5f} -> {ic_kl:.5f}")
    assert dense_ppl < pruned_ppl
    assert ic_ppl < pruned_ppl
    assert ic_kl < 0.75 * pruned_kl
    # only the pool trained: the pruned weights are untouched, the teacher too
    for name, p in pruned.named_parameters():
        assert torch.equal(p, ic.base_model.get_parameter(name)), name
    assert ic.trainable_parameters() == 32 * (64 + 64) == ic.report()["pool"]["parameters"]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(0 < h["ic_delta_ratio"] < 1 for h in logs)
    assert all(0 < h["ic_attention_entropy"] <= math.log(32) + 1e-6 for h in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_fold_generate_save_reload_and_report(trained_lm, tmp_path):
    dense, tok, pruned, ic, _ = trained_lm
    ic = copy.deepcopy(ic)  # the module fixture stays wrapped for the other tests
    ids = tok(["The module provides functions for", "Return the number of items in"], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        wrapped = ic(**ids).logits
        generated = ic.generate(**ids, max_new_tokens=6, do_sample=False)
    assert not torch.equal(wrapped, pruned(**ids).logits)  # the pool does something
    # save -> reload onto a fresh copy of the pruned base: identical outputs
    ic.save_pretrained(tmp_path / "ic")
    assert sorted(os.listdir(tmp_path / "ic")) == [OUTPUT_MANIFEST, "ic_config.json", "ic_pool.safetensors"]
    saved = json.loads((tmp_path / "ic" / "ic_config.json").read_text())
    assert saved["method"] == "input_compensation" and saved["pool_size"] == 32 and saved["inject"] == "inputs_embeds"
    assert saved["ic_metadata"]["query_dim"] == 64
    reloaded = InputCompensatedModel.from_pretrained(copy.deepcopy(pruned).eval(), tmp_path / "ic")
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, wrapped)
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(HFPruneError, match=r"keys has shape \(32, 64\) but this model needs \(32, 32\)"):
        InputCompensatedModel.from_pretrained(narrow, tmp_path / "ic")
    # the report: pool parameters counted against the sparsity, zero after folding
    report = ic.report()
    base = report["base"]
    assert report["effective_sparsity"] == pytest.approx(base["zeros"] / (base["parameters"] + 32 * 128))
    assert report["pruned_linear"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert report["pruned_linear"]["sparsity_with_ic"] < report["pruned_linear"]["sparsity"]
    assert report["after_merge"]["parameters"] == 0 and report["after_merge"]["flops_per_query"] == 0
    # merge_and_unload: a plain LlamaForCausalLM with the same outputs and the same greedy generations
    merged = ic.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not merged.get_input_embeddings()._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, wrapped, rtol=0, atol=1e-5)
        assert torch.equal(merged.generate(**ids, max_new_tokens=6, do_sample=False), generated)
    merged.save_pretrained(tmp_path / "merged")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(stock(**ids).logits, wrapped, rtol=0, atol=1e-5)


def test_tied_embeddings_are_untied_before_folding(tokenizer, tmp_path):
    model = make_model("opt", vocab=len(tokenizer)).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    Pruner(model, tokenizer).prune(MagnitudeConfig(pattern="2:4"), progress=False)
    head = model.lm_head.weight.detach().clone()
    ic = InputCompensatedModel(model, InputCompensationConfig(pool_size=8, loss="task"))
    with torch.no_grad():
        ic.pool.values.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(6, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrapped = ic(input_ids=ids).logits
    merged = ic.merge_and_unload()
    assert merged.config.tie_word_embeddings is False
    assert torch.equal(merged.lm_head.weight, head)  # the output head keeps the original table
    assert not torch.equal(merged.get_input_embeddings().weight, head)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, wrapped, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "opt")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "opt").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, wrapped, rtol=0, atol=1e-5)


def test_push_to_hub_uploads_the_pool_with_its_card_and_reads_it_back(tokenizer, fake_hub):
    model = make_model("llama", vocab=len(tokenizer)).eval()
    base = copy.deepcopy(model)  # before wrapping: the wrapper installs hooks on the model it wraps
    ic = InputCompensatedModel(model, InputCompensationConfig(pool_size=4, loss="task"))
    with pytest.raises(HFPruneError, match="already has an input-compensation pool's hooks"):
        InputCompensatedModel(copy.deepcopy(model), InputCompensationConfig(pool_size=4, loss="task"))
    with torch.no_grad():
        ic.pool.values.normal_()  # a pool that does something, so the round trip is meaningful
    info = ic.push_to_hub("me/ic-pool", private=True, token="t")
    repo = fake_hub.repos["me/ic-pool"]
    assert repo.private is True and info.oid == repo.heads["main"]
    assert set(repo.files) == {"README.md", "ic_config.json", "ic_pool.safetensors"}
    meta, body = fake_hub.card("me/ic-pool")
    assert meta["library_name"] == "hf_prune" and "input-compensation" in meta["tags"]
    assert 'InputCompensatedModel.from_pretrained(pruned_model, "me/ic-pool")' in body
    assert "ic.merge_and_unload()" in body and "zero parameter" in body and "| pool entries | 4 |" in body
    again = InputCompensatedModel.from_pretrained(base, "me/ic-pool")
    ids = torch.randint(0, len(tokenizer), (2, 8))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ic(input_ids=ids).logits)


def test_pool_from_a_hub_revision_with_a_token(tokenizer, fake_hub):
    model = make_model("llama", vocab=len(tokenizer)).eval()
    base = copy.deepcopy(model)
    ic = InputCompensatedModel(model, InputCompensationConfig(pool_size=4, loss="task"))
    with torch.no_grad():
        ic.pool.values.normal_()
    ic.push_to_hub("me/ic-rev", revision="v2", token="hf_writer")
    assert "ic_pool.safetensors" not in fake_hub.repos["me/ic-rev"].files  # only on the branch
    start = len(fake_hub.requests)
    again = InputCompensatedModel.from_pretrained(base, "me/ic-rev", revision="v2", token="hf_reader")
    assert torch.equal(again.pool.values, ic.pool.values)
    sent = [r for r in fake_hub.requests[start:] if "/resolve/" in r.path]
    assert len(sent) >= 2 and all("/resolve/v2/" in r.path and r.headers.get("authorization") == "Bearer hf_reader"
                                  for r in sent)


# ------------------------------------------------------------------------------------------------ vision, Trainer


def _image_rows(family: str, n: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        row = {"pixel_values": torch.randn(3, 32, 32, generator=g)}
        if family == "clip":
            row["input_ids"] = torch.randint(6, vocab, (8,), generator=g)
        rows.append(row)
    return rows


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_trainer_end_to_end_with_pixel_compensation(family, tokenizer, tmp_path):
    model = make_model(family, vocab=len(tokenizer)).eval()
    dense = copy.deepcopy(model)
    if family == "vit":  # a calibrated 2:4 pruner on the vision tower
        Pruner(model).prune(WandaConfig(pattern="2:4"), calibration_dataset=make_batches("vit", tokenizer, [], n=8),
                            progress=False)
        config = InputCompensationConfig(pool_size=4, loss="kd_kl")
    else:  # CLIP: one pool for the image tower, KL on image-text logits plus MSE on the image embeddings
        Pruner(model, tokenizer).prune(MagnitudeConfig(sparsity=0.5), progress=False)
        config = InputCompensationConfig(pool_size=4, loss={"kd_kl": 1.0, "mse": 1.0}, feature="image_embeds")
    pruned = copy.deepcopy(model)
    ic = InputCompensatedModel(model, config, teacher=dense)
    assert ic.ic_config.inject == "pixel_values" and ic.ic_config.query_pool == "mean"
    trainer = Trainer(model=ic, args=_args(tmp_path, steps=8, lr=5e-2, save_strategy="steps", save_steps=8),
                      train_dataset=_image_rows(family, 32, len(tokenizer)), callbacks=[InputCompensationCallback()])
    trainer.train()
    ic.eval()
    assert float(ic.pool.values.detach().abs().max()) > 0  # V moved off zero
    for name, p in pruned.named_parameters():
        assert torch.equal(p, model.get_parameter(name)), name
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(h["ic_delta_ratio"] > 0 and "ic_attention_entropy" in h for h in logs)
    # every Trainer checkpoint is a loadable pool (the callback's on_save), and the state dict is the pool only
    checkpoint = tmp_path / "trainer" / "checkpoint-8"
    assert {"ic_config.json", "ic_pool.safetensors", "model.safetensors"} <= set(os.listdir(checkpoint))
    assert set(ic.state_dict()) == {"pool.keys", "pool.values"}
    reloaded = InputCompensatedModel.from_pretrained(copy.deepcopy(pruned).eval(), checkpoint)
    batch = {k: torch.stack([r[k] for r in _image_rows(family, 2, len(tokenizer))]) for k in ("pixel_values",)}
    with torch.no_grad():
        if family == "vit":
            out, again, plain = ic(**batch).logits, reloaded(**batch).logits, pruned(**batch).logits
        else:  # get_image_features bypasses CLIPModel.forward: the compensation still applies
            out = ic.get_image_features(**batch).pooler_output
            again = reloaded.get_image_features(**batch).pooler_output
            plain = pruned.get_image_features(**batch).pooler_output
    assert torch.equal(out, again) and not torch.equal(out, plain)
    report = ic.report()
    assert report["pool"]["value_dim"] == 3 * 32 * 32 and report["flops"]["encoder_per_input"] > 0
    assert report["after_merge"]["foldable"] is False


# ------------------------------------------------------------------------------------------------ train_base="retained"


def test_retained_weights_train_with_exact_masks_after_2_4(tokenizer, corpus, tmp_path):
    model = make_model("llama", vocab=len(tokenizer)).eval()
    dense = copy.deepcopy(model)
    Pruner(model, tokenizer).prune(SparseGPTConfig(pattern="2:4"), calibration_dataset=make_batches(
        "llama", tokenizer, corpus, n=8), progress=False)
    before = copy.deepcopy(model)
    ic = InputCompensatedModel(model, InputCompensationConfig(pool_size=8, loss={"kd_kl": 1.0, "task": 0.5},
                                                              train_base="retained"), teacher=dense)
    masks = ic.weight_masks
    assert len(masks.masks) == 14 and masks.sparsity() == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(6, len(tokenizer), (32, 16), generator=g)]
    trainer = Trainer(model=ic, args=_args(tmp_path, steps=6, lr=1e-2, weight_decay=0.1), train_dataset=rows,
                      callbacks=[InputCompensationCallback()])
    trainer.train()
    assert masks.violations(model) == 0
    changed = 0
    for name, keep in masks.masks.items():
        weight = model.get_parameter(name)
        assert nm_violations(weight, 2, 4) == 0
        changed += int(not torch.equal(weight, before.get_parameter(name)))
        state = trainer.optimizer.state[weight]
        assert bool((state["exp_avg"][~keep] == 0).all()) and bool((state["exp_avg_sq"][~keep] == 0).all())
    assert changed == len(masks.masks)  # the kept weights did train
    assert torch.equal(model.get_input_embeddings().weight, before.get_input_embeddings().weight)  # frozen
    assert set(ic.state_dict()) == {"pool.keys", "pool.values"} | {f"base_model.{n}" for n in masks.masks}
    # without the callback the same training revives pruned weights (and the wrapper warns): the check can fail
    model2 = copy.deepcopy(before)
    ic2 = InputCompensatedModel(model2, ic.ic_config, teacher=dense)
    with pytest.warns(UserWarning, match="InputCompensationCallback"):
        Trainer(model=ic2, args=_args(tmp_path, steps=2, lr=1e-2, weight_decay=0.1), train_dataset=rows).train()
    assert ic2.weight_masks.violations(model2) > 0


# ------------------------------------------------------------------------------------- the shared trained decoder

# it lives next to the checkout (../shared/models/), on every machine and in CI
PYLM = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "models",
                                     "pylm"))
PYLM_DATA = os.path.join(os.path.dirname(PYLM), "pylm-data")


@pytest.mark.skipif(not os.path.isdir(PYLM), reason=f"the shared trained decoder is not at {PYLM}")
def test_pool_trained_in_domain_lowers_heldout_loss_after_wanda_2_4_on_the_trained_decoder(tmp_path):
    """Wanda 2:4 on ../shared/models/pylm, then the default recipe (its lr, cosine schedule, keep_best) for a few
    dozen steps on calibration.txt: the held-out loss on heldout.txt windows never seen in training or selection
    goes down, the kept pool is the best evaluated one, and the folded model computes the same."""
    from hf_prune import CalibrationConfig

    base = Pruner.from_pretrained(PYLM, dtype=torch.float32)
    dense, tok = copy.deepcopy(base.model).eval(), base.tokenizer
    base.prune(WandaConfig(pattern="2:4", calibration=CalibrationConfig(
        dataset=f"{PYLM_DATA}/calibration.txt", num_samples=16, seq_len=256, seed=0)), progress=False)
    pruned = base.model.eval()
    train, _ = perplexity_windows(tok, f"{PYLM_DATA}/calibration.txt", seq_len=128)
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:256]]
    held, _ = perplexity_windows(tok, f"{PYLM_DATA}/heldout.txt", seq_len=256)
    test, select = held[:12], held[48:52]

    def loss(model):
        with torch.no_grad():
            return float(model(input_ids=test, labels=test).loss)

    before = loss(pruned)
    config = InputCompensationConfig(lr=1e-2, steps=36, eval_steps=12)  # a short run: the larger of the good lrs
    ic = InputCompensatedModel(pruned, config, teacher=dense)
    trainer = Trainer(model=ic, args=config.training_arguments(str(tmp_path / "t"), per_device_train_batch_size=8,
                                                               use_cpu=True, disable_tqdm=True, seed=0),
                      train_dataset=[{"input_ids": row} for row in train],
                      eval_dataset=[{"input_ids": row, "labels": row} for row in select],
                      callbacks=[InputCompensationCallback()])
    trainer.train()
    ic.eval()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 12, 24, 36]
    best = min(evals, key=lambda h: h["eval_loss"])
    assert ic.kept == {"step": best["step"], "eval_loss": pytest.approx(best["eval_loss"]), "last_step": 36}
    assert ic.report()["kept"]["step"] == best["step"] > 0
    after = loss(ic.base_model)  # the wrapper's own loss is the IC loss (KL); the base keeps the pool's hooks
    print(f"held-out loss after Wanda 2:4: {before:.4f} -> {after:.4f} with IC (kept step {best['step']})")
    assert after < before - 0.005
    folded = ic.merge_and_unload()
    assert loss(folded) == pytest.approx(after, abs=1e-4)


def test_keep_best_returns_the_pruned_model_when_training_only_hurts(tmp_path):
    """A learning rate far too large wrecks the pool; keep_best restores the step-0 pool (values zero: exactly the
    pruned model), so IC is never worse than pruning alone on the evaluation data. Without labels in the
    evaluation data it says what is missing."""
    tok_model = make_model("llama", vocab=64)
    pruned = copy.deepcopy(tok_model)
    Pruner(pruned, None).prune(MagnitudeConfig(sparsity=0.5), progress=False)
    rows = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    config = InputCompensationConfig(pool_size=8, lr=50.0, steps=4, eval_steps=2)
    spare = copy.deepcopy(pruned)
    ic = InputCompensatedModel(pruned, config, teacher=tok_model)
    args = config.training_arguments(str(tmp_path / "t"), per_device_train_batch_size=8, use_cpu=True,
                                     disable_tqdm=True, seed=0)
    trainer = Trainer(model=ic, args=args, train_dataset=[{"input_ids": r} for r in rows],
                      eval_dataset=[{"input_ids": r, "labels": r} for r in rows[:8]],
                      callbacks=[InputCompensationCallback()])
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3 and evals[0] < min(evals[1:])
    assert ic.kept["step"] == 0 and torch.count_nonzero(ic.pool.values) == 0
    with pytest.raises(ValueError, match="differs from the config"):
        config.training_arguments(str(tmp_path / "u"), learning_rate=1e-3)
    ic2 = InputCompensatedModel(spare, config, teacher=tok_model)
    no_labels = Trainer(model=ic2, args=args, train_dataset=[{"input_ids": r} for r in rows],
                        eval_dataset=[{"input_ids": r} for r in rows[:8]], callbacks=[InputCompensationCallback()])
    with pytest.raises(HFPruneError, match="'labels' column"):
        no_labels.train()


def test_fold_into_a_scaled_embedding_keeps_the_outputs():
    """Gemma's embedding returns sqrt(hidden) * E[i]: the fold must give the table E + Δ(s E) / s, not E + Δ(E)."""
    model = make_model("gemma2").eval()
    scale = float(model.get_input_embeddings().embed_scale)
    assert scale > 2.0  # sqrt(hidden): the case a plain fold gets wrong
    ic = InputCompensatedModel(model, InputCompensationConfig(pool_size=8))
    with torch.no_grad():
        ic.pool.values.normal_(0.0, 0.5)
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    with torch.no_grad():
        wrapped = ic(input_ids=ids).logits
        plain_fold = fold_into_table(model.get_input_embeddings().weight.detach(), ic.pool.keys, ic.pool.values,
                                     ic.pool.temperature, ic.pool.normalize_query)
    merged = ic.merge_and_unload()
    with torch.no_grad():
        folded = merged(input_ids=ids).logits
        assert torch.allclose(folded, wrapped, atol=1e-4, rtol=1e-4)
        merged.get_input_embeddings().weight.copy_(plain_fold)  # the unscaled fold: visibly different outputs
        assert not torch.allclose(merged(input_ids=ids).logits, wrapped, atol=1e-2)


def test_fold_refuses_an_embedding_that_is_not_a_multiple_of_its_rows():
    model = make_model("llama").eval()
    embedding = model.get_input_embeddings()
    shift = embedding.register_forward_hook(lambda module, args, out: out + 1.0)  # not s * E[i]
    ic = InputCompensatedModel(model, InputCompensationConfig(pool_size=4))
    before = embedding.weight.detach().clone()
    with pytest.raises(HFPruneError, match="does not return a constant multiple of its embedding rows"):
        ic.merge_and_unload()
    assert torch.equal(embedding.weight, before)  # nothing changed
    shift.remove()
