"""Config validation messages, the registry round trip and forward compatibility."""

from __future__ import annotations

import json
import warnings

import pytest

from hf_prune import (
    CalibrationConfig,
    MagnitudeConfig,
    ModHiFiConfig,
    PrunerConfig,
    RIAConfig,
    SparseGPTConfig,
    WandaConfig,
    available_methods,
)
from hf_prune.methods.layerwise import LayerwiseConfig


@pytest.mark.parametrize("kwargs,words", [
    (dict(sparsity=1.0), r"WandaConfig.sparsity=1.0 must be a number in \[0.0, 1.0\)"),
    (dict(sparsity=-0.1), "sparsity=-0.1"),
    (dict(sparsity="half"), "sparsity='half'"),
    (dict(pattern="dense"), "pattern='dense' is not understood"),
    (dict(pattern="4:4"), "1 <= N < M"),
    (dict(pattern="2:4", sparsity=0.3), "pattern 2:4 removes exactly 0.5"),
    (dict(pattern="2:4", module_sparsity={"a": 0.1}), "cannot be combined with pattern 2:4"),
    (dict(target_modules=["q_proj("]), r"target_modules: 'q_proj\(' is not a valid regular expression"),
    (dict(exclude_modules=[]), "exclude_modules must be a regex string or a non-empty list"),
    (dict(module_sparsity={"x": 1.5}), r"module_sparsity\['x'\]=1.5"),
    (dict(scope="column"), "WandaConfig.scope='column' is not supported; choose one of 'row', 'matrix'"),
])
def test_bad_fields_name_the_problem(kwargs, words):
    with pytest.raises(ValueError, match=words):
        WandaConfig(**kwargs)


def test_method_specific_validation():
    with pytest.raises(ValueError, match="SparseGPTConfig.block_size=0"):
        SparseGPTConfig(block_size=0)
    with pytest.raises(ValueError, match="block_size=6 must be a multiple of M=4"):
        SparseGPTConfig(block_size=6, pattern="2:4")
    with pytest.raises(ValueError, match="RIAConfig.alpha"):
        RIAConfig(alpha=-1)
    with pytest.raises(ValueError, match="CalibrationConfig.num_samples=0"):
        CalibrationConfig(num_samples=0)
    with pytest.raises(ValueError, match="CalibrationConfig.packing='stream'"):
        CalibrationConfig(packing="stream")
    with pytest.raises(TypeError, match="calibration must be a CalibrationConfig"):
        WandaConfig(calibration="c4")
    with pytest.raises(TypeError, match="abstract"):
        PrunerConfig()
    with pytest.raises(TypeError):
        LayerwiseConfig()


def test_defaults_and_implied_sparsity():
    assert WandaConfig().sparsity == 0.5 and WandaConfig().pattern == "unstructured"
    assert WandaConfig(pattern="1:4").sparsity == 0.75
    assert WandaConfig(pattern="4:8", sparsity=0.5).pattern == "4:8"
    assert {"input_compensation", "magnitude", "ria", "sparsegpt", "wanda"} <= set(available_methods())


@pytest.mark.parametrize("config", [
    MagnitudeConfig(sparsity=0.3, scope="row"),
    WandaConfig(pattern="2:4", target_modules=["mlp"], calibration=CalibrationConfig(num_samples=7, seq_len=99)),
    SparseGPTConfig(sparsity=0.6, block_size=64, damp=0.05, module_sparsity={"model.layers.0.mlp.up_proj": 0.2}),
    RIAConfig(alpha=1.0, exclude_modules=["o_proj"]),
    ModHiFiConfig(sparsity=0.3, selection="global_ratio", score="saliency", damp=0.05, num_iterations=2),
])
def test_registry_round_trip(config, tmp_path):
    path = config.save_pretrained(tmp_path)
    data = json.loads(open(path).read())
    assert data["method"] == config.method and "hf_prune_version" in data
    loaded = PrunerConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and loaded == config
    assert type(config).from_pretrained(tmp_path) == config
    assert PrunerConfig.from_dict(config.to_dict()) == config


def test_newer_keys_warn_not_crash(tmp_path):
    data = WandaConfig().to_dict()
    data["hf_prune_version"] = "9.0.0"
    data["future_knob"] = 3
    data["calibration"]["future_cal_knob"] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PrunerConfig.from_dict(data)
    assert loaded == WandaConfig()
    text = " ".join(str(w.message) for w in caught)
    assert "future_knob" in text and "9.0.0" in text and "future_cal_knob" in text


def test_dispatch_errors(tmp_path):
    with pytest.raises(ValueError, match=f"unknown pruning method 'obs'; available: {', '.join(available_methods())}"):
        PrunerConfig.from_dict({"method": "obs"})
    with pytest.raises(ValueError, match="not SparseGPTConfig"):
        SparseGPTConfig.from_dict(WandaConfig().to_dict())
    with pytest.raises(FileNotFoundError, match="no pruning_config.json"):
        PrunerConfig.from_pretrained(tmp_path)


def test_in_memory_calibration_is_described_not_serialised():
    config = WandaConfig(calibration=CalibrationConfig(dataset=["a text", "another"]))
    described = config.to_dict()["calibration"]["dataset"]
    assert described.startswith("<in-memory list of 2 texts, sha256:")
    json.dumps(config.to_dict())  # always JSON-ready


def test_result_config_records_the_calibration_source(tokenizer, corpus):
    from conftest import make_model

    from hf_prune import Pruner

    config = WandaConfig(calibration=CalibrationConfig(num_samples=2, seq_len=16))
    result = Pruner(make_model("llama", vocab=len(tokenizer)), tokenizer).prune(
        config, calibration_dataset="builtin:python-docs", progress=False)
    assert result.config.calibration.dataset == "builtin:python-docs"
    assert config.calibration.dataset is None  # the caller's config is not mutated
    assert result.report["config"]["calibration"]["dataset"] == "builtin:python-docs"
