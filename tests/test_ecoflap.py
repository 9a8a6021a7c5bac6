"""ECoFLaP: scoring invariants (bit-exact restores, private RNG, flags), estimators against exact
gradients, ranking of an obviously more important block, end to end on LLaMA, CLIP and BLIP-2 with
per-sub-model budgets, the allocation as a reusable object, the card, the CLI and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as T
from conftest import make_batches, make_model

from hf_prune import Allocation, CalibrationConfig, ECoFLaPConfig, Pruner, PrunerConfig, SparseGPTConfig, WandaConfig
from hf_prune.cli import main
from hf_prune.methods.ecoflap import allocate
from hf_prune.models import get_family

CPU = torch.device("cpu")


def _cal(batches=None, **kwargs) -> CalibrationConfig:
    return CalibrationConfig(**{"num_samples": 8, "batch_size": 4, "dataset": batches, **kwargs})


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _blip2(vocab):
    model = make_model("blip2", vocab=vocab)
    # Blip2VisionConfig initialises every vision weight with std 1e-10, so the tiny tower's output is ~0 and
    # the caption loss cannot depend on it; give the tower a trained-like scale
    with torch.no_grad():
        for p in model.vision_model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def _kill_block(model, index):
    """Scale block ``index``'s input norms to ~0: its Linears see ~zero inputs, so it contributes almost
    nothing and the loss hardly depends on any of its weights."""
    layer = model.get_submodule(get_family(model).stages(model)[0].path)[index]
    with torch.no_grad():
        layer.input_layernorm.weight.fill_(1e-4)
        layer.post_attention_layernorm.weight.fill_(1e-4)


def _stage_zeros(model, allocation, stage):
    names = [m for g in allocation.groups.values() if g["stage"] == stage for m in g["modules"]]
    return sum(int((model.get_submodule(n).weight == 0).sum()) for n in names)


# ------------------------------------------------------------------------------------------------ scoring invariants


@pytest.mark.parametrize("perturb", ["tensor", "block"])
def test_zeroth_order_leaves_weights_bit_identical_and_global_rng_untouched(perturb, tokenizer, corpus):
    model = make_model("llama", vocab=len(tokenizer)).to(torch.bfloat16)  # add-then-subtract would drift here
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _snapshot(model)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    config = ECoFLaPConfig(zo_perturb=perturb, zo_num_noise=2, num_score_samples=4,
                           target_modules=["mlp.up_proj", "self_attn.v_proj"],
                           calibration=_cal(make_batches("llama", tokenizer, corpus, n=4)))
    allocation = allocate(Pruner(model, tokenizer), config, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator was neither read nor advanced
    assert _unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(g["raw_score"] > 0 for g in allocation.groups.values())
    units = 4 if perturb == "tensor" else 2  # 2 Linears in each of 2 blocks, or one unit per block
    # 1 batch x units x noises x (+/-), plus the unperturbed forward that records the blocks' outputs
    assert allocation.provenance["passes"]["forward"] == units * 2 * 2 + 1
    assert allocation.provenance["loss"]["kind"] == "causal_lm"


def test_zeroth_order_restores_weights_when_a_forward_fails(tokenizer, corpus):
    model = make_model("llama", vocab=len(tokenizer))
    before = _snapshot(model)
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of a perturbed pass
            raise RuntimeError("device lost")

    model.model.layers[1].mlp.register_forward_pre_hook(explode)
    config = ECoFLaPConfig(num_score_samples=4, calibration=_cal(make_batches("llama", tokenizer, corpus)))
    with pytest.raises(RuntimeError, match="device lost"):
        allocate(Pruner(model, tokenizer), config, progress=False)
    assert _unchanged(model, before)


def test_first_order_restores_flags_and_existing_grads(tokenizer, corpus):
    model = make_model("llama", vocab=len(tokenizer))
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[1].self_attn.q_proj.weight.requires_grad_(False)  # a scored weight that had no grad
    kept_grad = torch.full_like(model.model.layers[0].mlp.down_proj.weight, 0.25)
    model.model.layers[0].mlp.down_proj.weight.grad = kept_grad
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _snapshot(model)
    rng = torch.get_rng_state()
    config = ECoFLaPConfig(score="first_order", num_score_samples=8,
                           calibration=_cal(make_batches("llama", tokenizer, corpus)))
    allocation = allocate(Pruner(model, tokenizer), config, progress=False)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.model.layers[0].mlp.down_proj.weight.grad is kept_grad and bool((kept_grad == 0.25).all())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "model.layers.0.mlp.down_proj.weight")
    assert _unchanged(model, before) and torch.equal(torch.get_rng_state(), rng)
    assert allocation.provenance["passes"] == {"forward": 2, "backward": 2, "block_recomputations": 2}
    assert all("forward" not in block.__dict__ for block in model.model.layers)  # checkpointing undone


# ------------------------------------------------------------------------------------------------ estimators


def _exact_gradients(model, batches):
    """dL/dW of every block Linear per batch, from the model's own HF loss (labels = ids, padding -100)."""
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    grads = []
    for batch in batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        grads.append(dict(zip(weights, torch.autograd.grad(loss, list(weights.values())))))
    return weights, grads


def test_first_order_scores_are_exact_weight_times_gradient_sums(tokenizer, corpus):
    model = make_model("llama", vocab=len(tokenizer))
    batches = make_batches("llama", tokenizer, corpus)
    weights, grads = _exact_gradients(model.eval(), batches)
    config = ECoFLaPConfig(score="first_order", granularity="layer", num_score_samples=8, calibration=_cal(batches))
    allocation = allocate(Pruner(model, tokenizer), config, progress=False)
    for name, weight in weights.items():
        expected = sum(float((weight.detach().abs() * g[name].abs()).double().sum()) for g in grads) / len(grads)
        assert allocation.groups[name]["raw_score"] == pytest.approx(expected, rel=1e-4), name


class _Toy(torch.nn.Module):
    """Two Linears and a tanh: small enough for thousands of exact-gradient comparisons per second."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.first = torch.nn.Linear(8, 16)
        self.second = torch.nn.Linear(16, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x, target=None):
        return self.second(torch.tanh(self.first(x)))


class _MSE:
    label_free = False

    def value(self, model, batch):
        return (model(batch["x"]) - batch["target"]).pow(2).mean()


@pytest.fixture()
def one_thread():
    """Thousands of forward passes on 8x16 matrices: intra-op threads only add synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_zeroth_order_estimates_sqrt_2_over_pi_times_the_gradient_norm(one_thread):
    """E|<g, z>| = sqrt(2/pi) ||g|| for z ~ N(0, I): with many directions the estimate converges to it."""
    from hf_prune.methods.ecoflap.scores import Unit, zeroth_order_scores

    model = _Toy().eval()
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(32, 8, generator=g), "target": torch.randn(32, 4, generator=g)}
    grads = torch.autograd.grad(_MSE().value(model, batch), [model.first.weight, model.second.weight])
    units = [Unit("first", "first", [model.first.weight]), Unit("second", "second", [model.second.weight]),
             Unit("both", "both", [model.first.weight, model.second.weight])]
    scores = zeroth_order_scores(model, units, [batch], _MSE(), eps=1e-3, num_noise=2000, seed=0, device=CPU,
                                 progress=False)
    norms = {"first": grads[0].norm(), "second": grads[1].norm(),
             "both": torch.cat([grads[0].flatten(), grads[1].flatten()]).norm()}  # "block": the group's norm
    for name, norm in norms.items():
        # the mean of 2000 |N(0, s^2)| has a relative spread of 1.7%: 6% is 3.5 sigma
        assert scores[name] == pytest.approx(math.sqrt(2 / math.pi) * float(norm), rel=0.06), name


def test_label_free_zeroth_order_estimates_the_output_jacobian_norm(one_thread):
    """For a Linear's weight, f(W + eps z) - f(W) = eps z x on every token, so the one-sided estimate is
    ||z X^T||_F / sqrt(tokens), whose square has mean out_features * ||X||_F^2 / tokens."""
    from hf_prune.methods.ecoflap.losses import ScoringLoss
    from hf_prune.methods.ecoflap.scores import Unit, zeroth_order_scores

    layer = torch.nn.Linear(64, 256).eval()
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    scores = zeroth_order_scores(layer, [Unit("w", "w", [layer.weight])], [{"input": x}],
                                 ScoringLoss("output_sensitivity"), eps=1e-3, num_noise=200, seed=0, device=CPU,
                                 progress=False)
    expected = math.sqrt(256 * float(x.pow(2).sum()) / 10)
    assert scores["w"] == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("score", ["zeroth_order", "first_order"])
@pytest.mark.parametrize("head", ["lm", "none"])
@pytest.mark.parametrize("dead", [0, 1])
def test_scores_rank_the_live_block_first(score, head, dead, tokenizer, corpus):
    model = make_model("llama", vocab=len(tokenizer))
    if head == "none":
        model = model.model  # LlamaModel: no labels, scored with the label-free output sensitivity
    _kill_block(model, dead)
    config = ECoFLaPConfig(sparsity=0.5, score=score, num_score_samples=4,
                           calibration=_cal(make_batches("llama", tokenizer, corpus, n=4)))
    allocation = allocate(Pruner(model, tokenizer), config, progress=False)
    assert allocation.provenance["loss"]["kind"] == ("causal_lm" if head == "lm" else "output_sensitivity")
    prefix = "model.layers" if head == "lm" else "layers"
    live, gone = allocation.groups[f"{prefix}.{1 - dead}"], allocation.groups[f"{prefix}.{dead}"]
    assert live["raw_score"] > 20 * gone["raw_score"], (live["raw_score"], gone["raw_score"])
    assert live["sparsity"] < 0.5 < gone["sparsity"] == pytest.approx(config.max_sparsity, abs=1e-3)


# ------------------------------------------------------------------------------------------------ end to end


def test_llama_end_to_end_save_reload_and_reuse_the_allocation(tokenizer, corpus, tmp_path):
    batches = make_batches("llama", tokenizer, corpus)
    model = make_model("llama", vocab=len(tokenizer))
    pruner = Pruner(model, tokenizer)
    config = ECoFLaPConfig(sparsity=0.6, granularity="layer", zo_perturb="block", num_score_samples=8,
                           calibration=_cal())
    result = pruner.prune(config, calibration_dataset=batches, progress=False)
    allocation = result.allocation
    assert isinstance(allocation, Allocation) and result.report["allocation"] == allocation.to_dict()
    assert result.report["method"] == "ecoflap" and result.report["layer_pruner"]["method"] == "wanda"
    assert result.report["config"]["max_sparsity"] == pytest.approx(0.7)
    budget = allocation.budgets["global"]
    assert budget["keep"] == budget["budget_keep"] == budget["size"] - round(0.6 * budget["size"])
    sparsities = list(allocation.module_sparsity.values())
    assert max(sparsities) <= 0.7 + 1e-12 and max(sparsities) - min(sparsities) > 0.05  # not uniform
    per_module = result.report["sparsity"]["per_module"]
    for name, target in allocation.module_sparsity.items():
        weight = model.get_submodule(name).weight
        assert per_module[name]["target"] == target
        # Wanda prunes round(target * in_features) weights in every row
        assert torch.all((weight == 0).sum(1) == math.floor(target * weight.shape[1] + 0.5)), name
    assert result.sparsity == pytest.approx(0.6, abs=0.01)

    out = pruner.save_pretrained(tmp_path / "eco")
    assert PrunerConfig.from_pretrained(out).to_dict() == result.config.to_dict()
    loaded = Allocation.load(out)
    assert loaded.to_dict() == json.loads(json.dumps(allocation.to_dict()))
    png = (tmp_path / "eco" / "sparsity_allocation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    card = (tmp_path / "eco" / "README.md").read_text()
    assert "## Sparsity allocation" in card and "![Per-module sparsity allocation](sparsity_allocation.png)" in card
    assert "pruned with ECoFLaP" in card and "next-token cross-entropy" in card
    report = json.loads((tmp_path / "eco" / "pruning_report.json").read_text())
    assert report["allocation"]["module_sparsity"] == allocation.module_sparsity
    reloaded = T.LlamaForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))

    # stage 2 again from the saved allocation, with no scores recomputed: the very same weights
    fresh = make_model("llama", vocab=len(tokenizer))
    Pruner(fresh, tokenizer).prune(WandaConfig(sparsity=0.6, module_sparsity=loaded, calibration=_cal()),
                                   calibration_dataset=batches, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    as_json = WandaConfig(module_sparsity=json.loads((tmp_path / "eco" / "sparsity_allocation.json").read_text()))
    assert as_json.module_sparsity == allocation.module_sparsity


@pytest.mark.parametrize("per_submodel", [True, False])
def test_clip_contrastive_scores_and_budgets(per_submodel, tokenizer, corpus):
    model = make_model("clip", vocab=len(tokenizer))
    config = ECoFLaPConfig(sparsity=0.5, score="first_order", granularity="layer", per_submodel_budget=per_submodel,
                           layer_pruner="ria", num_score_samples=8, calibration=_cal())
    result = Pruner(model, tokenizer).prune(config, calibration_dataset=make_batches("clip", tokenizer, corpus),
                                            progress=False)
    allocation = result.allocation
    assert allocation.provenance["loss"]["kind"] == "clip_contrastive"
    assert set(allocation.budgets) == ({"vision", "text"} if per_submodel else {"global"})
    for budget in allocation.budgets.values():
        assert budget["keep"] == budget["budget_keep"] == budget["size"] - round(0.5 * budget["size"])
    # RIA meets each module's count exactly, so the achieved zeros are the allocation's, budget by budget
    zeros = {stage: _stage_zeros(model, allocation, stage) for stage in ("vision", "text")}
    sizes = {stage: sum(g["size"] for g in allocation.groups.values() if g["stage"] == stage)
             for stage in ("vision", "text")}
    if per_submodel:
        for stage in ("vision", "text"):
            assert zeros[stage] == sizes[stage] - allocation.budgets[stage]["keep"]
    else:
        assert sum(zeros.values()) == sum(sizes.values()) - allocation.budgets["global"]["keep"]
    assert max(allocation.module_sparsity.values()) <= config.max_sparsity + 1e-12


def test_blip2_caption_scores_with_one_budget_per_submodel(tokenizer, corpus):
    model = _blip2(len(tokenizer))
    config = ECoFLaPConfig(sparsity=0.6, zo_perturb="block", per_submodel_budget=True, layer_pruner="sparsegpt",
                           layer_pruner_kwargs={"block_size": 32}, num_score_samples=8, calibration=_cal())
    result = Pruner(model, tokenizer).prune(config, calibration_dataset=make_batches("blip2", tokenizer, corpus),
                                            progress=False)
    allocation = result.allocation
    assert allocation.provenance["loss"]["kind"] == "caption_lm"
    assert result.report["layer_pruner"]["config"]["block_size"] == 32
    assert list(allocation.budgets) == ["vision", "qformer", "language"]
    assert len(allocation.groups) == 6 and all(g["raw_score"] > 0 for g in allocation.groups.values())
    for stage, budget in allocation.budgets.items():
        assert budget["keep"] == budget["budget_keep"]
        assert _stage_zeros(model, allocation, stage) == budget["size"] - budget["keep"]  # SparseGPT: exact counts
        group_sparsity = [allocation.groups[g]["sparsity"] for g in budget["groups"]]
        assert max(group_sparsity) <= 0.7 + 1e-12 and max(group_sparsity) > min(group_sparsity)


@pytest.mark.parametrize("case,loss", [
    ("llama", "causal_lm"), ("opt", "causal_lm"), ("bert", "output_sensitivity"), ("vit", "output_sensitivity"),
    ("vit+labels", "model_loss"), ("clip", "clip_contrastive"), ("clip_vision", "output_sensitivity"),
    ("clip_text", "output_sensitivity"), ("blip2", "caption_lm"),
])
def test_every_family_gets_its_loss_and_an_exact_budget(case, loss, tokenizer, corpus):
    family = case.split("+")[0].replace("clip_vision", "clip").replace("clip_text", "clip")
    model = _blip2(len(tokenizer)) if family == "blip2" else make_model(family, vocab=len(tokenizer))
    batches = make_batches(family, tokenizer, corpus)
    if case == "vit+labels":
        batches = [{**b, "labels": torch.arange(len(b["pixel_values"])) % 3} for b in batches]
    if case == "clip_vision":  # one tower alone: the family walks its own encoder
        model = T.CLIPVisionModel(model.config.vision_config)
        batches = [{"pixel_values": b["pixel_values"]} for b in batches]
    if case == "clip_text":
        model = T.CLIPTextModel(model.config.text_config)
        batches = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
    config = ECoFLaPConfig(sparsity=0.6, score="first_order", layer_pruner="magnitude", num_score_samples=8,
                           calibration=_cal())
    result = Pruner(model, tokenizer).prune(config, calibration_dataset=batches, progress=False)
    allocation = result.allocation
    assert allocation.provenance["loss"]["kind"] == loss
    assert all(g["raw_score"] > 0 for g in allocation.groups.values())
    budget = allocation.budgets["global"]
    assert budget["keep"] == budget["size"] - round(0.6 * budget["size"])
    zeros = sum(e["zeros"] for e in result.report["sparsity"]["per_module"].values())
    assert zeros == budget["size"] - budget["keep"]  # Magnitude meets each module's count exactly


# ------------------------------------------------------------------------------------------------ quality


@pytest.fixture(scope="module")
def minilm(minilm_path, heldout):
    from hf_prune.demo import sentence_embeddings

    dense = Pruner.from_pretrained(minilm_path, dtype=torch.float32)
    sentences = heldout[:96]
    return sentences, sentence_embeddings(dense.model, dense.tokenizer, sentences)


def test_ecoflap_keeps_real_minilm_closer_to_dense_than_uniform_wanda_at_70(minilm_path, minilm):
    """On the trained all-MiniLM-L6-v2 (label-free output-sensitivity scores), at 70% overall sparsity."""
    from hf_prune.demo import sentence_embeddings

    sentences, reference = minilm
    cal = CalibrationConfig(num_samples=32, seq_len=96, packing="pad", batch_size=16)

    def cosine(config):
        pruner = Pruner.from_pretrained(minilm_path, dtype=torch.float32)
        result = pruner.prune(config, calibration_dataset="builtin:python-docs", progress=False)
        assert result.sparsity == pytest.approx(0.7, abs=2e-3)
        return float((sentence_embeddings(pruner.model, pruner.tokenizer, sentences) * reference).sum(-1).mean())

    uniform = cosine(WandaConfig(sparsity=0.7, calibration=cal))  # measured: 0.598
    first = cosine(ECoFLaPConfig(sparsity=0.7, score="first_order", granularity="layer", num_score_samples=16,
                                 calibration=cal))  # 0.633
    zeroth = cosine(ECoFLaPConfig(sparsity=0.7, zo_perturb="block", num_score_samples=16, calibration=cal))  # 0.615
    assert first > uniform + 0.02 and zeroth > uniform + 0.01, (uniform, first, zeroth)


# ------------------------------------------------------------------------------------------------ config, CLI, errors


def test_config_defaults_round_trip_and_stage2():
    config = ECoFLaPConfig(sparsity=0.6)
    assert config.max_sparsity == 0.7 and config.granularity == "block" and config.score == "zeroth_order"
    assert ECoFLaPConfig(sparsity=0.95).max_sparsity == pytest.approx(0.975)
    back = PrunerConfig.from_dict(json.loads(config.to_json_string()))
    assert back == config and isinstance(back, ECoFLaPConfig)
    stage2 = ECoFLaPConfig(layer_pruner="sparsegpt", layer_pruner_kwargs={"damp": 0.05},
                           target_modules=["mlp"]).layer_pruner_config(module_sparsity={"a": 0.3})
    assert isinstance(stage2, SparseGPTConfig) and stage2.damp == 0.05 and stage2.target_modules == ["mlp"]
    assert stage2.module_sparsity == {"a": 0.3}


@pytest.mark.parametrize("kwargs,words", [
    (dict(sparsity=1.0), r"ECoFLaPConfig.sparsity=1.0 must be a number in \[0.0, 1.0\)"),
    (dict(sparsity=0.6, max_sparsity=0.5), "max_sparsity=0.5 is below sparsity=0.6"),
    (dict(max_sparsity=1.0), r"max_sparsity=1.0 must be a number in \[0.0, 1.0\)"),
    (dict(granularity="head"), "granularity='head' is not supported; choose one of 'block', 'layer', 'submodel'"),
    (dict(score="second_order"), "score='second_order' is not supported"),
    (dict(aggregate="max"), "aggregate='max'"),
    (dict(zo_eps=0.0), r"zo_eps=0.0 must be a number in \(0.0, 1.0\]"),
    (dict(zo_num_noise=0), "zo_num_noise=0 must be an integer >= 1"),
    (dict(zo_perturb="layer"), "zo_perturb='layer' is not supported; choose one of 'tensor', 'design', 'block'"),
    (dict(num_score_samples=0), "num_score_samples=0"),
    (dict(per_submodel_budget="yes"), "per_submodel_budget='yes' must be True or False"),
    (dict(pattern="2:4"), "an N:M pattern removes exactly 0.5 of every module"),
    (dict(layer_pruner="ecoflap"), "layer_pruner='ecoflap' is not a layer-wise pruner; choose one of"),
    (dict(layer_pruner="obs"), "layer_pruner='obs'"),
    (dict(layer_pruner_kwargs={"sparsity": 0.3}), r"layer_pruner_kwargs sets \['sparsity'\], which ECoFLaP sets"),
    (dict(layer_pruner_kwargs={"blocksize": 3}), "layer_pruner_kwargs={'blocksize': 3} is not valid for WandaConfig"),
    (dict(layer_pruner="sparsegpt", layer_pruner_kwargs={"block_size": 0}), "SparseGPTConfig.block_size=0"),
    (dict(target_modules=["q_proj("]), "not a valid regular expression"),
])
def test_bad_config_fields_name_the_problem(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ECoFLaPConfig(**kwargs)


@pytest.mark.parametrize("case,words", [
    ("clip_batch_of_one", "needs at least 2 image-text pairs per batch"),
    ("no_data", "no calibration data was given"),
    ("bad_regex", "matches no Linear layer"),
    ("short_text_for_stage2", "too short"),
])
def test_bad_input_fails_before_any_weight_changes(case, words, tokenizer, corpus):
    family = "clip" if case == "clip_batch_of_one" else "llama"
    model = make_model(family, vocab=len(tokenizer))
    before = _snapshot(model)
    kwargs, data = {}, make_batches(family, tokenizer, corpus)
    if case == "clip_batch_of_one":
        data = make_batches("clip", tokenizer, corpus, batch=1)
    elif case == "no_data":
        data = None
    elif case == "bad_regex":
        kwargs["target_modules"] = ["no_such_module"]
    else:  # the scores would fit, but stage 2's 4000 windows of 64 tokens do not
        data = corpus[:50]
        kwargs["calibration"] = CalibrationConfig(num_samples=4000, seq_len=64)
        kwargs["num_score_samples"] = 2
    config = ECoFLaPConfig(**{"calibration": _cal(), "num_score_samples": 8, **kwargs})
    with pytest.raises(ValueError, match=words):
        Pruner(model, tokenizer).prune(config, calibration_dataset=data, progress=False)
    assert _unchanged(model, before)


def test_cli_ecoflap_then_reuse_the_allocation(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "tiny-llama"
    make_model("llama", vocab=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["--calibration", "builtin:python-docs", "--num-samples", "8", "--seq-len", "32", "--no-progress",
              "--target-modules", "mlp", "self_attn.o_proj"]
    out = tmp_path / "eco"
    assert main(["prune", str(model_dir), "--method", "ecoflap", "--sparsity", "0.6", "--max-sparsity", "0.8",
                 "--score", "first_order", "--granularity", "layer", "--per-submodel-budget", "--layer-pruner",
                 "sparsegpt", "--layer-pruner-kwargs", '{"block_size": 32}', "--num-score-samples", "8",
                 "--output", str(out), *common]) == 0
    config = json.loads((out / "pruning_config.json").read_text())
    assert config["method"] == "ecoflap" and config["layer_pruner_kwargs"] == {"block_size": 32}
    assert config["target_modules"] == ["mlp", "self_attn.o_proj"] and config["per_submodel_budget"] is True
    assert {"sparsity_allocation.json", "sparsity_allocation.png"} <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    assert "overall" in printed and "allocation (allocated sparsity per budget" in printed and "decoder" in printed

    again = tmp_path / "reuse"
    assert main(["prune", str(model_dir), "--method", "sparsegpt", "--block-size", "32", "--sparsity", "0.6",
                 "--module-sparsity", str(out / "sparsity_allocation.json"), "--output", str(again), *common]) == 0
    first = T.LlamaForCausalLM.from_pretrained(out).state_dict()
    second = T.LlamaForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert main(["report", str(out)]) == 0 and "match the report" in capsys.readouterr().out


def test_planner_adds_the_scoring_stage_with_the_whole_model_on_the_device():
    import os

    from hf_prune.planner import plan

    config = os.path.join(os.path.dirname(__file__), "data", "configs", "llama-2-7b.json")
    eco, wanda = plan(config, "ecoflap", throughput=1e12), plan(config, "wanda", throughput=1e12)
    scores, decoder = eco.stages
    assert scores.name == "ecoflap scores (zeroth_order)" and decoder == wanda.stages[0]  # then Wanda as usual
    assert scores.device_peak > eco.weight_bytes and eco.device_peak == scores.device_peak
    blocks, head = 2 * 8 * decoder.block_params * 32 * 2048, 2 * 8 * 32000 * 4096 * 2048  # one batch of 8
    perturbed = head + blocks * 33 / 64  # the blocks before the perturbed one are replayed: (32 + 1) / (2 x 32)
    # 8 samples = 1 batch: 32 blocks x 8 passes (the sign design of 7 Linears) and one recording pass
    assert scores.flops == pytest.approx(32 * 8 * perturbed + blocks + head)
    assert eco.flops == scores.flops + wanda.flops



# ----------------------------------------------------------------------------------------- cost: design, early stop


def test_sign_design_is_balanced_orthogonal_and_the_central_difference_for_one_tensor():
    from hf_prune.methods.ecoflap.scores import sign_design

    assert sign_design(1) == [[1.0], [-1.0]]  # L(W + eps z) - L(W - eps z): the paper's pair
    for m, n in [(2, 4), (3, 4), (4, 8), (6, 8), (7, 8), (8, 16)]:
        rows = torch.tensor(sign_design(m))
        assert rows.shape == (n, m)
        assert torch.equal(rows.sum(0), torch.zeros(m))  # the unperturbed loss cancels
        assert torch.equal(rows.T @ rows, n * torch.eye(m))  # each tensor's derivative read off alone


def _scoring_setup(tokenizer, corpus):
    from hf_prune.methods.ecoflap.losses import ScoringLoss
    from hf_prune.methods.ecoflap.scores import Unit

    model = make_model("llama", vocab=len(tokenizer))
    blocks = list(model.model.layers)
    units = [Unit(name, name, [m.weight]) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in name]
    return model, blocks, units, make_batches("llama", tokenizer, corpus, n=4, batch=2), ScoringLoss("causal_lm")


def test_design_reads_each_tensors_directional_derivative_off_the_blocks_passes(tokenizer, corpus):
    from hf_prune.methods.ecoflap.scores import zeroth_order_scores

    model, blocks, units, batches, loss = _scoring_setup(tokenizer, corpus)
    before = _snapshot(model)
    common = dict(num_noise=2, seed=0, device=CPU, progress=False, blocks=blocks)
    tensor = zeroth_order_scores(model, units, batches, loss, eps=1e-3, **common)
    design = zeroth_order_scores(model, units, batches, loss, eps=1e-3, design=True, **common)
    assert _unchanged(model, before)
    # the same directions z_j, 8 passes per block instead of 14: the same |<grad_j L, z_j>| up to the other tensors'
    # O(eps) cross terms, small against a block's score (what the block allocation uses) ...
    for i in range(2):
        names = [n for n in tensor if n.startswith(f"model.layers.{i}.")]
        assert sum(design[n] for n in names) == pytest.approx(sum(tensor[n] for n in names), rel=1e-2)
    # ... and shrinking with eps: per tensor too (the smallest scores here are 1/200 of the largest)
    tensor = zeroth_order_scores(model, units, batches, loss, eps=1e-4, **common)
    design = zeroth_order_scores(model, units, batches, loss, eps=1e-4, design=True, **common)
    for name in tensor:
        assert design[name] == pytest.approx(tensor[name], rel=6e-2), name
    common["eps"] = 1e-3
    # a unit alone (no blocks: nothing to perturb it with) gets exactly the central difference
    alone = zeroth_order_scores(model, units, batches, loss, design=True, **{**common, "blocks": None})
    assert alone == zeroth_order_scores(model, units, batches, loss, **{**common, "blocks": None})


def test_without_early_stopping_the_scores_are_the_old_ones_bit_for_bit(tokenizer, corpus):
    from hf_prune.methods.ecoflap.scores import Unit, zeroth_order_scores

    model = make_model("llama", vocab=len(tokenizer))
    batches = make_batches("llama", tokenizer, corpus, n=4, batch=2)
    config = ECoFLaPConfig(zo_perturb="tensor", zo_stop_tol=None, num_score_samples=4, granularity="layer",
                           calibration=_cal(batches))
    allocation = allocate(Pruner(model, tokenizer), config, progress=False)
    assert "early_stopping" not in allocation.provenance
    # the scoring as it was before early stopping: every batch at once, one Linear at a time, nothing replayed
    units = [Unit(name, name, [model.get_submodule(name).weight]) for name in allocation.groups]
    from hf_prune.methods.ecoflap.losses import ScoringLoss
    old = zeroth_order_scores(model, units, batches, ScoringLoss("causal_lm"), eps=config.zo_eps, num_noise=1,
                              seed=config.calibration.seed, device=CPU, progress=False)
    assert {g: e["raw_score"] for g, e in allocation.groups.items()} == old  # ==: bit for bit
    assert allocation.provenance["passes"]["forward"] == 2 * (len(units) * 2 + 1)


@pytest.mark.parametrize("tol,stopped", [(0.5, "converged"), (1e-9, "maximum")])
def test_early_stopping_stops_once_the_allocation_converges_and_records_its_rounds(tol, stopped, tokenizer, corpus):
    model = make_model("llama", vocab=len(tokenizer))
    before = _snapshot(model)
    batches = make_batches("llama", tokenizer, corpus, n=8, batch=1)
    config = ECoFLaPConfig(sparsity=0.5, num_score_samples=8, zo_stop_tol=tol, zo_round_samples=2,
                           calibration=_cal(batches))
    assert config.zo_min_samples == 4  # two rounds by default
    allocation = allocate(Pruner(model, tokenizer), config, progress=False)
    assert _unchanged(model, before)
    record = allocation.provenance["early_stopping"]
    assert record["stopped"] == stopped
    rounds = record["rounds"]
    assert [r["samples"] for r in rounds] == list(range(2, record["samples_used"] + 1, 2))
    assert rounds[0]["max_sparsity_change"] is None and all(r["max_sparsity_change"] >= 0 for r in rounds[1:])
    if stopped == "converged":  # a loose tolerance: the first round that may stop does
        assert record["samples_used"] == 4 < config.num_score_samples
        assert rounds[-1]["max_sparsity_change"] <= tol
    else:  # a tolerance no noisy estimate meets: every sample is scored
        assert record["samples_used"] == 8 and all(r["max_sparsity_change"] > tol for r in rounds[1:])
    per_batch = 2 * 8 + 1  # 2 blocks x 8 passes of the design (7 Linears each), one recording pass
    assert allocation.provenance["passes"]["forward"] == record["batches_used"] * per_batch
    assert record["batches_used"] == record["samples_used"]  # batches of one sample


def test_early_stopping_is_recorded_in_the_report(tokenizer, corpus):
    model = make_model("llama", vocab=len(tokenizer))
    batches = make_batches("llama", tokenizer, corpus, n=8, batch=1)
    config = ECoFLaPConfig(sparsity=0.5, num_score_samples=8, zo_stop_tol=0.5, zo_round_samples=2,
                           calibration=_cal(batches))
    result = Pruner(model, tokenizer).prune(config, calibration_dataset=batches, progress=False)
    record = result.report["allocation"]["provenance"]["early_stopping"]
    assert record["stopped"] == "converged" and record["samples_used"] == 4 and len(record["rounds"]) == 2


@pytest.mark.parametrize("kwargs,words", [
    (dict(zo_stop_tol=0.0), r"zo_stop_tol=0.0 must be a sparsity change in \(0, 1\)"),
    (dict(zo_stop_tol=1.5), r"zo_stop_tol=1.5 must be a sparsity change in \(0, 1\).*or None to score all"),
    (dict(zo_stop_tol=True), "zo_stop_tol=True must be a sparsity change"),
    (dict(zo_stop_tol="0.01"), "zo_stop_tol='0.01' must be a sparsity change"),
    (dict(zo_round_samples=0), "zo_round_samples=0 must be an integer >= 1"),
    (dict(zo_min_samples=0), "zo_min_samples=0 must be an integer between 1 and num_score_samples=8"),
    (dict(num_score_samples=32, zo_stop_tol=0.01, zo_min_samples=40),
     "zo_min_samples=40 must be an integer between 1 and num_score_samples=32.*raise num_score_samples"),
])
def test_bad_early_stopping_values_name_the_problem(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ECoFLaPConfig(**kwargs)


def test_cli_turns_early_stopping_off_with_none():
    from hf_prune.cli import _split_config_args, build_parser

    argv = ["prune", "m", "--method", "ecoflap", "--zo-stop-tol", "none", "--zo-perturb", "tensor"]
    method_args, _ = _split_config_args(build_parser(argv).parse_args(argv))
    assert method_args["zo_stop_tol"] is None and ECoFLaPConfig(**method_args).zo_stop_tol is None
    argv[5] = "0.02"
    assert _split_config_args(build_parser(argv).parse_args(argv))[0]["zo_stop_tol"] == 0.02
    argv[5] = "soon"
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(argv)
