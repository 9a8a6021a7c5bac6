"""Property-based hardening: any accepted config prunes and keeps its sparsity promise exactly; any rejected
one raises hf_prune's own ValueError/TypeError, never an error from inside torch."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import transformers as T

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hf_prune import CalibrationConfig, MagnitudeConfig, Pruner, RIAConfig, SparseGPTConfig, WandaConfig  # noqa: E402
from hf_prune.patterns import Pattern, nm_violations, prune_count  # noqa: E402

HF_PRUNE = os.path.dirname(os.path.dirname(os.path.abspath(__import__("hf_prune").__file__)))
CONFIGS = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig, "ria": RIAConfig}
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(hidden: int, intermediate: int, vocab: int = 64):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))


def _batches(vocab: int = 64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


patterns = st.one_of(st.just("unstructured"),
                     st.sampled_from([2, 4, 8]).flatmap(lambda m: st.integers(1, m - 1).map(lambda n: f"{n}:{m}")))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(sorted(CONFIGS)), pattern=patterns,
       sparsity=st.floats(0.0, 0.99, allow_nan=False), hidden=st.sampled_from([16, 24, 32]),
       intermediate=st.sampled_from([24, 40, 48]), targets=st.sets(st.sampled_from(MODULES), max_size=3))
def test_accepted_configs_keep_their_promise(method, pattern, sparsity, hidden, intermediate, targets):
    kwargs = {"pattern": pattern, "target_modules": sorted(targets) or None,
              "calibration": CalibrationConfig(num_samples=4)}
    if pattern == "unstructured":
        kwargs["sparsity"] = sparsity
    try:
        config = CONFIGS[method](**kwargs)
    except ValueError:
        pytest.fail(f"a valid config was rejected: {kwargs}")
    model = _model(hidden, intermediate)
    p = Pattern.parse(pattern)
    try:
        result = Pruner(model).prune(config, calibration_dataset=_batches(), progress=False)
    except ValueError as exc:  # the only acceptable refusal: N:M on a width M does not divide
        assert p.is_nm and "multiple of" in str(exc), exc
        assert any(w % p.m for w in (hidden, intermediate))
        return
    for name, entry in result.report["sparsity"]["per_module"].items():
        w = model.get_submodule(name).weight
        if p.is_nm:
            assert nm_violations(w, p.n, p.m) == 0
            assert entry["zeros"] == w.shape[0] * (w.shape[1] // p.m) * (p.m - p.n)
        elif getattr(config, "scope", "matrix") == "row":
            assert bool(((w == 0).sum(1) == prune_count(w.shape[1], config.sparsity)).all())
        else:
            assert entry["zeros"] == prune_count(w.numel(), config.sparsity)


junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=6), st.lists(st.text(max_size=4), max_size=2),
                 st.dictionaries(st.text(max_size=4), st.floats(allow_nan=True), max_size=2))


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(sorted(CONFIGS)),
       field=st.sampled_from(["sparsity", "pattern", "target_modules", "exclude_modules", "module_sparsity", "scope",
                              "alpha", "block_size", "damp", "calibration"]),
       value=junk)
def test_rejected_configs_raise_our_own_errors(method, field, value):
    try:
        config = CONFIGS[method](**{field: value})
    except (ValueError, TypeError) as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        origin = frames[-1].filename
        assert origin.startswith(HF_PRUNE) or "dataclasses" in origin or origin == "<string>", (origin, exc)
        assert str(exc)
        return
    # accepted: pruning must then work (or refuse with our own error before touching weights)
    model = _model(32, 48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        Pruner(model).prune(config, calibration_dataset=_batches(), progress=False)
    except (ValueError, TypeError) as exc:
        origin = traceback.extract_tb(exc.__traceback__)[-1].filename
        assert origin.startswith(HF_PRUNE), (origin, exc)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
