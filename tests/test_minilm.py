"""On the real, trained all-MiniLM-L6-v2: activation-aware pruning keeps what the model knows better
than magnitude pruning does (sentence-embedding cosine to the dense model on held-out sentences)."""

from __future__ import annotations

import pytest
import torch

from hf_prune import CalibrationConfig, MagnitudeConfig, Pruner, RIAConfig, SparseGPTConfig, WandaConfig
from hf_prune.demo import sentence_embeddings


@pytest.fixture(scope="module")
def setup(minilm_path, heldout):
    dense = Pruner.from_pretrained(minilm_path, dtype=torch.float32)
    sentences = heldout[:96]
    return minilm_path, sentences, sentence_embeddings(dense.model, dense.tokenizer, sentences)


def _cosine(setup, config):
    path, sentences, reference = setup
    pruner = Pruner.from_pretrained(path, dtype=torch.float32)
    result = pruner.prune(config, calibration_dataset="builtin:python-docs", progress=False)
    assert result.sparsity == pytest.approx(0.5, abs=1e-6)
    return float((sentence_embeddings(pruner.model, pruner.tokenizer, sentences) * reference).sum(-1).mean())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude_on_real_minilm(setup, pattern):
    cal = CalibrationConfig(num_samples=48, seq_len=96, packing="pad", batch_size=16)
    mag = _cosine(setup, MagnitudeConfig(pattern=pattern))
    wanda = _cosine(setup, WandaConfig(pattern=pattern, calibration=cal))
    sgpt = _cosine(setup, SparseGPTConfig(pattern=pattern, calibration=cal))
    assert wanda > mag + 0.05 and sgpt > mag + 0.05, (mag, wanda, sgpt)
    assert sgpt > wanda  # reconstruction beats selection alone
    if pattern == "unstructured":
        assert _cosine(setup, RIAConfig(calibration=cal)) > mag + 0.05
