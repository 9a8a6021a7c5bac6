"""SPP on decoder LLMs: RoPE-pair tying and grouped-query sharing of the masks on tiny LLaMA, materialization
that removes whole key/value groups, and the training-free solution path (ours) against RIA."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import transformers as T
from conftest import make_batches, make_model

from hf_prune import Pruner, SolutionPath, SPPConfig
from hf_prune.methods.ria.ops import ria_prune_mask
from hf_prune.methods.spp import SPPMasks, attach_masks, save_model
from hf_prune.methods.spp.ops import iss_weight_path
from hf_prune.patterns import Pattern
from hf_prune.structured import needs_variable_layout


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_model("llama", vocab=len(tokenizer))


@pytest.fixture(scope="module")
def batch(tokenizer, corpus):
    return make_batches("llama", tokenizer, corpus, n=4, batch=4, seq=24)[0]


def test_qk_masks_tie_rope_pairs_and_serve_the_whole_query_group(llama, batch):
    model = copy.deepcopy(llama)
    masks = attach_masks(model, SPPConfig(share_across_heads=False))
    specs = {u.kind: u for u in masks.specs if u.block == "model.layers.0"}
    assert specs["qk"].shape == [2, 8] and specs["vo"].shape == [2, 16] and specs["mlp"].shape == [128]
    assert specs["qk"].rope and specs["qk"].cost["params"] == 2 * (64 + 2 * 64)  # a pair: k rows + 2 query heads
    with torch.no_grad():
        masks.units[0].alpha[1, 3] = 0.0  # key/value head 1, rotary pair (3, 11)
    hooked = _logits(model, batch)
    masks.remove(model)
    attn = lambda m: m.model.layers[0].self_attn  # noqa: E731
    by_k, by_q, half = copy.deepcopy(llama), copy.deepcopy(llama), copy.deepcopy(llama)
    with torch.no_grad():
        attn(by_k).k_proj.weight[[16 + 3, 16 + 11]] = 0  # the pair, pre-rotary, in k
        for head in (2, 3):  # ... equals removing the same pair from q for every query head of the group
            attn(by_q).q_proj.weight[[16 * head + 3, 16 * head + 11]] = 0
        attn(half).k_proj.weight[16 + 3] = 0  # only half of the pair: not a removal under RoPE
    torch.testing.assert_close(hooked, _logits(by_k, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked, _logits(by_q, batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, _logits(half, batch), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hooked, _logits(llama, batch), rtol=1e-4, atol=1e-4)


def _crafted_path(model, late_vo: dict[str, list[int]]) -> SolutionPath:
    """A path whose entries enter in index order, except the v-o entries of the listed key/value heads, last."""
    masks = attach_masks(model, SPPConfig(share_across_heads=False))
    with torch.no_grad():
        for spec, state in zip(masks.specs, masks.units):
            n = state.first_entry.numel()
            times = torch.arange(1, n + 1, dtype=torch.float32).view(spec.shape) / n
            if spec.kind == "vo":
                for head in late_vo.get(spec.block, []):
                    times[head] = 10.0 + times[head]
            state.first_entry.copy_(times)
    path = masks.solution_path(model)
    masks.remove(model)
    return path


@pytest.mark.parametrize("uniform", [False, True])
def test_materialize_removes_whole_key_value_groups_and_reloads(llama, batch, uniform, tmp_path):
    model = copy.deepcopy(llama)
    late = {"model.layers.0": [1], **({"model.layers.1": [0]} if uniform else {})}
    path = _crafted_path(model, late)
    # per_group vo: 64 entries; removing 25% (uniform: 50%) drops exactly the late heads
    sparsity = 0.5 if uniform else 0.25
    keep = path.masks_at(sparsity, budget="entries")
    assert not bool(keep["model.layers.0.vo"][1].any()) and bool(keep["model.layers.0.vo"][0].all())
    masked, small = path.apply(model, sparsity, budget="entries"), path.materialize(model, sparsity, budget="entries")
    torch.testing.assert_close(_logits(small, batch), _logits(masked, batch), rtol=1e-5, atol=1e-5)
    layer0 = small.model.layers[0].self_attn
    assert (layer0.q_proj.out_features, layer0.k_proj.out_features, layer0.o_proj.in_features) == (32, 16, 32)
    assert layer0.head_dim == 16  # rotary: the head width never changes
    assert needs_variable_layout(small) is not uniform
    folder = save_model(small, tmp_path / "small")
    if uniform:
        assert (small.config.num_attention_heads, small.config.num_key_value_heads, small.config.head_dim) == (2, 1, 16)
        loaded = T.LlamaForCausalLM.from_pretrained(folder)
    else:
        loaded = T.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    torch.testing.assert_close(_logits(loaded, batch), _logits(small, batch), rtol=0, atol=0)


def test_pruner_reads_the_path_and_the_cli_recounts_the_stored_tensors(llama, batch, tmp_path, capsys):
    from hf_prune.cli import main

    model = copy.deepcopy(llama)
    _crafted_path(model, {"model.layers.0": [1]}).save_pretrained(tmp_path / "path")
    pruner = Pruner(model)
    result = pruner.prune(SPPConfig(path=str(tmp_path / "path"), sparsity=0.25, budget="entries"))
    assert result.report["read_off"]["per_group"]["vo"]["removed_entries"] == 16
    folder = pruner.save_pretrained(tmp_path / "out")
    assert main(["report", folder]) == 0
    printed = capsys.readouterr().out
    # layer 0: all 7 Linears; layer 1: q, k (zeroed q-k dims), gate, up, down
    assert "pattern: structured" in printed and "weights: the zeros of all 12 pruned tensors" in printed
    loaded = T.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    torch.testing.assert_close(_logits(loaded, batch), _logits(pruner.model, batch), rtol=0, atol=0)


def test_manual_loop_without_trainer(llama, batch):
    """``SPPMasks.advance`` is the whole update: a plain loop drives it as the callback does."""
    model = copy.deepcopy(llama)
    config = SPPConfig(lr=1e-2, lam=0.16, record_every=2, groups=("qk", "mlp"), coupling="released")
    masks = attach_masks(model, config)
    optimizer = torch.optim.AdamW(masks.alphas(), lr=config.lr, eps=config.adam_epsilon, weight_decay=0.0)
    model.train()
    for _ in range(6):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        masks.advance(config.lr, int(optimizer.state[masks.alphas()[0]]["step"]), 0.9, record=True)
        optimizer.zero_grad()
    path = masks.solution_path(model)
    assert {u["kind"] for u in path.units} == {"qk", "mlp"}
    assert path.search == {"steps": 6, "time": pytest.approx(0.06), "records": 6}
    # eta_k = lr / (1 - 0.9^k): z grows by the bias-corrected steps (0.1, 0.053, 0.037) while alpha stays near 1,
    # so entries cross lam=0.16 at the third step, path time 3 x lr
    assert sum(config.lr / (1 - 0.9 ** k) for k in range(1, 4)) > config.lam > sum(config.lr / (1 - 0.9 ** k)
                                                                                     for k in range(1, 3))
    first = path.tensors["0.first_entry"]
    assert bool(torch.isfinite(first).any()) and float(first[torch.isfinite(first)].min()) == pytest.approx(0.03)


# --------------------------------------------------------------------------------------------------
# the training-free path (ours)


def _exact_path(weight, gram, alpha):
    """Brute-force reference: the same removal ISS, one weight at a time (rates recomputed after each removal)."""
    from hf_prune.methods.ria.ops import ria_scores

    w, g = weight.float(), gram.float()
    scores = ria_scores(weight, gram.diagonal(), alpha)
    removed = torch.zeros_like(w, dtype=torch.bool)
    z = torch.zeros_like(w)
    order = []
    while not bool(removed.all()):
        ratio = (1 + 2 * (torch.where(removed, w, 0.0) @ g) / (w * g.diagonal())).clamp_min(1e-3)
        rate = 1 / (scores * ratio)
        need = torch.where(removed, torch.full_like(z, math.inf), (1 - z) / rate)
        flat = int(need.flatten().argmin())
        z = torch.where(removed, z, z + float(need.flatten()[flat]) * rate)
        removed.view(-1)[flat] = True
        order.append(flat)
    return order[::-1]  # the last removed first, as ranks count


def test_training_free_path_is_ria_with_uncorrelated_inputs_and_exact_event_by_event():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 10, generator=g)
    diag = torch.rand(10, generator=g) + 0.1
    rank, curve = iss_weight_path(weight, torch.diag(diag), alpha=0.5, step_fraction=0.05)
    assert sorted(rank.flatten().tolist()) == list(range(120))
    assert float(curve[0]) == 0.0 and bool((curve[1:] >= curve[:-1]).all())
    for s in (0.1, 0.3, 0.5, 0.7, 0.9):  # diagonal Gram: every read-off is RIA's per-matrix mask
        keep = rank < 120 - round(s * 120)
        assert torch.equal(~keep, ria_prune_mask(weight, diag, s, Pattern.parse("unstructured"), 0.5, "matrix"))
    x = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g)  # correlated inputs
    gram = x.T @ x / 400
    weight = torch.randn(5, 6, generator=g)
    rank, _ = iss_weight_path(weight, gram, alpha=0.5, step_fraction=1 / 30)  # one weight per event
    assert rank.flatten().argsort().tolist() == _exact_path(weight, gram, 0.5)
    ria_order = ria_prune_mask(weight, gram.diagonal(), 0.5, Pattern.parse("unstructured"), 0.5, "matrix")
    assert not torch.equal(rank >= 15, ria_order)  # correlations change the selection


def test_training_free_pruner_gives_every_sparsity_from_one_pass(tokenizer, corpus, tmp_path):
    model = make_model("llama", vocab=len(tokenizer))
    dense = copy.deepcopy(model)
    pruner = Pruner(model, tokenizer)
    config = SPPConfig(sparsity=0.5, training_free=True,
                       calibration={"num_samples": 8, "seq_len": 32, "batch_size": 4})
    result = pruner.prune(config, calibration_dataset=corpus[:400], progress=False)
    assert result.sparsity == pytest.approx(0.5, abs=1e-3)
    assert all(e["achieved"] == pytest.approx(0.5, abs=1 / e["numel"])
               for e in result.report["sparsity"]["per_module"].values())
    assert "hf_prune's own variant" in result.report["method_note"]
    path = result.path
    assert path.kind == "unstructured" and len(path.units) == 14  # 7 Linears x 2 blocks
    masks = [path.masks_at(s) for s in (0.1, 0.3, 0.5, 0.7)]
    for low, high in zip(masks, masks[1:]):
        assert all(bool((high[n] <= low[n]).all()) for n in path.names)
    for name in path.names:  # the in-place read-off is the path's 0.5 mask
        weight = pruner.model.get_submodule(name).weight
        assert torch.equal(weight != 0, masks[2][name])
    thirty = path.apply(dense, 0.3)
    assert all(float((thirty.get_submodule(n).weight == 0).float().mean()) == pytest.approx(0.3, abs=0.01)
               for n in path.names)
    with pytest.raises(ValueError, match="cannot make a smaller model"):
        path.materialize(dense, 0.3)
    path.save_pretrained(tmp_path / "path")
    again = SolutionPath.from_pretrained(tmp_path / "path")
    assert all(torch.equal(again.masks_at(0.6)[n], path.masks_at(0.6)[n]) for n in path.names)
    assert again.read_off(0.6)["achieved"]["params"] == pytest.approx(0.6, abs=1e-3)
    again.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 5000
    assert not SPPMasks.find(pruner.model)


def test_training_free_path_is_an_explicit_experimental_option(tokenizer, corpus):
    """On trained weights the training-free path does not beat RIA at every sparsity (benchmarks/README.md), so it
    is not what SPPConfig does by default: without a saved path Pruner.prune refuses with directions, before any
    weight changes, and runs the path only with training_free=True."""
    from hf_prune.registry import get_method

    model = make_model("llama", vocab=len(tokenizer))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"has no path.*RIAConfig.*training_free=True.*Nothing was changed"):
        Pruner(model, tokenizer).prune(SPPConfig(sparsity=0.5), calibration_dataset=corpus[:400], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    spec = get_method("spp")
    assert SPPConfig().training_free is False and spec.needs_data(SPPConfig()) is False
    assert spec.needs_data(SPPConfig(training_free=True)) is True
    assert spec.needs_data(SPPConfig(path="some/path")) is False
    with pytest.raises(ValueError, match="set only one of them"):
        SPPConfig(path="some/path", training_free=True)
    with pytest.raises(ValueError, match="correction"):
        SPPConfig(training_free=True, correction=1.5)
    config = SPPConfig(training_free=True, correction=0.2)
    assert SPPConfig.from_dict(config.to_dict()) == config


def test_path_correction_zero_is_ria_order_and_scales_the_cross_terms():
    """correction=0 ranks exactly by RIA's score; any correction leaves a diagonal Gram's path unchanged."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 8, generator=g)
    x = torch.randn(64, 8, generator=g) @ torch.randn(8, 8, generator=g)
    gram = x.t() @ x / 64
    from hf_prune.methods.ria.ops import ria_scores

    rank0, _ = iss_weight_path(weight, gram, correction=0.0, step_fraction=1 / 48)
    scores = ria_scores(weight, gram.diagonal(), 0.5).flatten()
    assert torch.equal(torch.argsort(rank0.flatten()), torch.argsort(-scores, stable=True))
    diagonal = torch.diag(gram.diagonal())
    assert torch.equal(iss_weight_path(weight, diagonal, correction=0.3)[0], iss_weight_path(weight, diagonal)[0])
    assert not torch.equal(iss_weight_path(weight, gram, correction=1.0)[0], rank0)


# ------------------------------------------------------------------------------------- the shared trained decoder

PYLM = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "models",
                                     "pylm"))
PYLM_DATA = os.path.join(os.path.dirname(PYLM), "pylm-data")


@pytest.mark.skipif(not os.path.isdir(PYLM), reason=f"the shared trained decoder is not at {PYLM}")
def test_training_free_path_at_half_is_not_worse_than_ria_on_the_trained_decoder():
    """The issue's check on real weights: on ../shared/models/pylm, calibrated on 16 x 256 tokens of
    calibration.txt, the training-free path's 50% read-off has a held-out loss (16 windows of 256 tokens of
    heldout.txt, never trained on) no higher than RIA's at 50% from the same data; both are exactly 50% sparse.
    (At 30% it is not ahead of RIA, which is why it is an experimental option: benchmarks/README.md.)"""
    from hf_prune import CalibrationConfig, RIAConfig
    from hf_prune.evaluation import perplexity_windows

    calibration = CalibrationConfig(dataset=f"{PYLM_DATA}/calibration.txt", num_samples=16, seq_len=256, seed=0)
    losses = {}
    for config in (RIAConfig(sparsity=0.5, calibration=calibration),
                   SPPConfig(sparsity=0.5, training_free=True, calibration=calibration)):
        pruner = Pruner.from_pretrained(PYLM, dtype=torch.float32)
        result = pruner.prune(config, progress=False)
        assert all(e["achieved"] == pytest.approx(0.5, abs=1 / e["numel"])
                   for e in result.report["sparsity"]["per_module"].values())
        held, _ = perplexity_windows(pruner.tokenizer, f"{PYLM_DATA}/heldout.txt", seq_len=256)
        with torch.no_grad():
            losses[type(config).__name__] = float(pruner.model.eval()(input_ids=held[:16], labels=held[:16]).loss)
    print(f"held-out loss at 50%: RIA {losses['RIAConfig']:.4f}, training-free SPP {losses['SPPConfig']:.4f}")
    assert losses["SPPConfig"] <= losses["RIAConfig"]
