"""RIA's channel permutation for N:M (``channel_permutation=True``): the pure math against brute force, the exact
function of the permuted model, N:M kept exactly with no larger reconstruction error, the config's refusals, and
the held-out loss on the shared trained decoder."""

from __future__ import annotations

import copy
import itertools
import os

import numpy as np
import pytest
import torch
import transformers as T
from conftest import FAMILIES, make_batches, make_model

from hf_prune import (
    CalibrationConfig,
    MagnitudeConfig,
    Pruner,
    RIAConfig,
    SparseGPTConfig,
    WandaConfig,
)
from hf_prune.engine.stats import LinearStats
from hf_prune.patterns import (
    linear_assignment,
    nm_channel_permutation,
    nm_kept_score,
    nm_violations,
)

# the shared trained decoder lives next to the checkout (../shared/models/), on every machine and in CI
SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "models"))
PYLM = os.path.join(SHARED, "pylm")
PYLM_DATA = os.path.join(SHARED, "pylm-data")

# ---------------------------------------------------------------------------------------------- pure math


def test_linear_assignment_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for size in range(1, 7):
        for _ in range(10):
            cost = rng.normal(size=(size, size)).round(1)  # rounding makes ties
            col = linear_assignment(cost)
            assert sorted(col.tolist()) == list(range(size))
            best = min(sum(cost[i, p[i]] for i in range(size)) for p in itertools.permutations(range(size)))
            assert cost[np.arange(size), col].sum() == pytest.approx(best, abs=1e-9)


def test_permutation_never_keeps_less_than_the_identity():
    """The N:M-kept score after the permutation is >= before, and never above the best over all orders."""
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        m = int(torch.randint(2, 5, (), generator=g))
        n = int(torch.randint(1, m, (), generator=g))
        cols = m * int(torch.randint(1, 8 // m + 1, (), generator=g))  # up to 8 columns: 8! orders to try
        rows = int(torch.randint(1, 5, (), generator=g))
        scores = torch.rand(rows, cols, generator=g) * torch.rand(1, cols, generator=g) ** 3
        perm = nm_channel_permutation(scores, n, m)
        assert sorted(perm.tolist()) == list(range(cols))
        after = nm_kept_score(scores[:, perm], n, m)
        assert after >= nm_kept_score(scores, n, m)
        orders = torch.tensor(list(itertools.permutations(range(cols))))
        kept = scores.double()[:, orders].reshape(rows, len(orders), cols // m, m).topk(n, dim=3).values.sum(dim=(0, 2, 3))
        best = float(kept.max())
        assert after <= best + 1e-9


def test_permutation_separates_clustered_important_channels():
    """Important channels side by side in one group: N:M must drop half of them unless they are dealt apart."""
    scores = torch.full((3, 8), 0.1)
    scores[:, :4] = 1.0  # channels 0-3 matter, all in the first group of 4
    perm = nm_channel_permutation(scores, 2, 4)
    assert nm_kept_score(scores, 2, 4) == pytest.approx(3 * (2 + 0.2))
    assert nm_kept_score(scores[:, perm], 2, 4) == pytest.approx(3 * 4.0)


def test_permuted_statistics_are_those_of_permuted_inputs():
    x = torch.randn(50, 8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    stats = LinearStats(8, frozenset({"sq_norm", "gram", "sum"}))
    stats.update(x)
    direct = LinearStats(8, frozenset({"sq_norm", "gram", "sum"}))
    direct.update(x[:, perm])
    moved = stats.permuted(perm)
    assert moved.tokens == direct.tokens
    for a, b in ((moved.sq_sum, direct.sq_sum), (moved.xtx, direct.xtx), (moved.x_sum, direct.x_sum)):
        assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the model


class _KeepAll(WandaConfig):
    """Wanda's permutation with nothing pruned: the permuted dense model."""

    def prune_weight(self, weight, stats, sparsity, pattern):
        return weight, torch.zeros_like(weight, dtype=torch.bool), {}


def _outputs(model, batches):
    model.eval()
    with torch.no_grad():
        out = []
        for b in batches:
            out.extend(v for v in model(**b).values() if torch.is_tensor(v))  # logits, hidden states, embeddings
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_permuted_dense_model_computes_the_same_function(family, tokenizer, corpus):
    model = make_model(family, vocab=len(tokenizer))
    batches = make_batches(family, tokenizer, corpus)
    reference = copy.deepcopy(model)
    result = Pruner(model, tokenizer).prune(_KeepAll(pattern="2:4", channel_permutation=True,
                                                     calibration=CalibrationConfig(num_samples=8)),
                                            calibration_dataset=batches, progress=False)
    permuted = result.report["channel_permutation"]["modules"]
    assert permuted, "no MLP was permuted"
    for name in permuted:  # really reordered, not left as they were
        assert not torch.equal(model.get_submodule(name).weight, reference.get_submodule(name).weight)
    for got, want in zip(_outputs(model, batches), _outputs(reference, batches)):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def _llama(tokenizer):
    return make_model("llama", vocab=len(tokenizer))


def _pruned(config_cls, permute, model, tokenizer, calibration, batches=None):
    """``model``'s down_projs 2:4-pruned with ``config_cls``; the result and, per down_proj, its reconstruction
    error ||(W - W_pruned) X||_F^2 / tokens, from the dense weight as it was pruned (permuted or not) and the Gram
    matrix of its inputs in the same order."""
    errors = []

    class Capture(config_cls):
        statistics = config_cls.statistics | {"gram"}

        def prune_weight(self, weight, stats, sparsity, pattern):
            new, mask, info = super().prune_weight(weight, stats, sparsity, pattern)
            diff = weight - new.masked_fill(mask, 0.0)
            errors.append(float(((diff @ stats.gram) * diff).sum()))
            return new, mask, info

    config = Capture(pattern="2:4", channel_permutation=permute, target_modules=["down_proj"], calibration=calibration)
    result = Pruner(model, tokenizer).prune(config, calibration_dataset=batches, progress=False)
    return result, errors


@pytest.mark.parametrize("config_cls", [RIAConfig, WandaConfig, SparseGPTConfig, MagnitudeConfig])
def test_two_four_with_permutation_is_exact_and_reconstructs_no_worse(config_cls, tokenizer, corpus):
    batches = make_batches("llama", tokenizer, corpus, n=16)
    calibration = CalibrationConfig(num_samples=16)
    _, plain = _pruned(config_cls, False, _llama(tokenizer), tokenizer, calibration, batches)
    model = _llama(tokenizer)
    result, permuted = _pruned(config_cls, True, model, tokenizer, calibration, batches)
    assert result.report["config"]["channel_permutation"] is True
    assert result.report["channel_permutation"]["modules"] == ["model.layers.0.mlp.down_proj",
                                                               "model.layers.1.mlp.down_proj"]
    for name, entry in result.report["sparsity"]["per_module"].items():
        weight = model.get_submodule(name).weight
        assert nm_violations(weight, 2, 4) == 0 and entry["zeros"] == weight.numel() // 2
        assert entry["channel_permutation"]["permuted"] and entry["channel_permutation"]["kept_score_gain"] > 0
        assert entry["channel_permutation"]["producers"] == [name.replace("down_proj", "gate_proj"),
                                                             name.replace("down_proj", "up_proj")]
    # block 0 sees the same inputs in both runs (in another order): the layer's own error compares directly
    assert permuted[0] <= plain[0]
    assert sum(permuted) <= sum(plain)


def test_permuted_and_pruned_model_reloads_with_stock_transformers(tokenizer, corpus, tmp_path):
    model = _llama(tokenizer)
    batches = make_batches("llama", tokenizer, corpus)
    pruner = Pruner(model, tokenizer)
    pruner.prune(RIAConfig(pattern="2:4", channel_permutation=True, calibration=CalibrationConfig(num_samples=8)),
                 calibration_dataset=batches, progress=False)
    pruner.save_pretrained(str(tmp_path / "out"))
    reloaded = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    for got, want in zip(_outputs(reloaded, batches), _outputs(model, batches)):
        assert torch.allclose(got, want, atol=1e-6)


def test_offloaded_model_permutes_and_prunes_as_in_memory(tokenizer, corpus, tmp_path):
    """Disk/CPU offload: the producers' rows are permuted in the weights maps too (same tensors as in memory)."""
    folder = tmp_path / "tiny"
    _llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = WandaConfig(pattern="2:4", channel_permutation=True,
                         calibration=CalibrationConfig(num_samples=4, seq_len=32, seed=0))
    reference = T.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    Pruner(reference, tokenizer).prune(config, calibration_dataset=corpus[:200], progress=False)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                  "model.layers.1": "cpu", "model.norm": "disk", "lm_head": "disk"}
    pruner = Pruner.from_pretrained(folder, dtype=torch.float32, device_map=device_map,
                                    offload_folder=str(tmp_path / "offload"))
    pruner.prune(config, calibration_dataset=corpus[:200], progress=False)
    reloaded = T.LlamaForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out"), dtype=torch.float32)
    want = reference.state_dict()
    assert [k for k, v in reloaded.state_dict().items() if not torch.equal(v, want[k])] == []


# ---------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize("config_cls", [RIAConfig, WandaConfig, SparseGPTConfig, MagnitudeConfig])
def test_config_refuses_permutation_without_n_m(config_cls):
    with pytest.raises(ValueError, match=r"channel_permutation=True .* needs pattern='N:M' \(e.g. '2:4'\), got "
                                         r"pattern='unstructured'"):
        config_cls(sparsity=0.5, channel_permutation=True)
    with pytest.raises(ValueError, match="channel_permutation must be True or False"):
        config_cls(pattern="2:4", channel_permutation="yes")
    assert config_cls(pattern="4:8", channel_permutation=True).channel_permutation is True
    assert config_cls().channel_permutation is False


def test_permutation_needs_an_mlp_output_among_the_targets(tokenizer, corpus):
    model = _llama(tokenizer)
    before = copy.deepcopy(model.state_dict())
    config = RIAConfig(pattern="2:4", channel_permutation=True, exclude_modules=["down_proj"],
                       calibration=CalibrationConfig(num_samples=8))
    with pytest.raises(ValueError, match="no pruned module is an MLP output Linear"):
        Pruner(model, tokenizer).prune(config, calibration_dataset=make_batches("llama", tokenizer, corpus),
                                       progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- trained weights


@pytest.mark.skipif(not os.path.isdir(PYLM), reason=f"the shared trained decoder is not at {PYLM}")
@pytest.mark.parametrize("config_cls", [RIAConfig, WandaConfig])
def test_permutation_lowers_reconstruction_error_on_the_trained_decoder(config_cls, one_thread):
    """On the shared trained decoder (Qwen3, 4 blocks, MLP 768), 2:4 with channel permutation leaves every
    down_proj at least 10% less reconstruction error than plain 2:4 (measured: 18-23% less for RIA and Wanda with
    16 or 32 calibration samples and two seeds).

    The held-out loss is not tested: over 16 or 48 windows RIA 2:4 with permutation was better in three of four
    calibration draws and worse in one (log-perplexity within +-0.008), so no claim on it holds (benchmarks/README.md
    has the 64-sample numbers)."""
    base = Pruner.from_pretrained(PYLM, dtype=torch.float32)
    calibration = CalibrationConfig(dataset=f"{PYLM_DATA}/calibration.txt", num_samples=16, seq_len=256, seed=0)
    _, plain = _pruned(config_cls, False, copy.deepcopy(base.model), base.tokenizer, calibration)
    _, permuted = _pruned(config_cls, True, base.model, base.tokenizer, calibration)
    assert len(plain) == len(permuted) == 4
    for layer, (p, q) in enumerate(zip(plain, permuted)):
        assert q <= 0.9 * p, f"down_proj of block {layer}: {q:.4g} with permutation, {p:.4g} without"
