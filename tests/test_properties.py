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

# the package folder itself: frames of the tests (which live next to it) never count as hf_prune's
HF_PRUNE = os.path.dirname(os.path.abspath(__import__("hf_prune").__file__)) + os.sep
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
                     st.integers(2, 8).flatmap(lambda m: st.integers(1, m - 1).map(lambda n: f"{n}:{m}")))
# widths that every M from 2 to 8 divides for some layer and not for others (head_dim stays even for RoPE)
HIDDEN = [16, 24, 28, 32]
INTERMEDIATE = [24, 35, 40, 42, 48]


def _full_name(module: str) -> str:
    return f"model.layers.0.{'mlp' if module.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{module}"


def _check_promise(model, result, config, pattern: str) -> None:
    """Every pruned module holds exactly its share of zeros, in N:M groups when asked."""
    p = Pattern.parse(pattern)
    overrides = config.module_sparsity or {}
    for name, entry in result.report["sparsity"]["per_module"].items():
        w = model.get_submodule(name).weight
        sparsity = overrides.get(name, config.sparsity)
        assert entry["target"] == sparsity
        if p.is_nm:
            assert nm_violations(w, p.n, p.m) == 0
            assert entry["zeros"] == w.shape[0] * (w.shape[1] // p.m) * (p.m - p.n)
        elif getattr(config, "scope", "matrix") == "row":
            assert bool(((w == 0).sum(1) == prune_count(w.shape[1], sparsity)).all())
        else:
            assert entry["zeros"] == prune_count(w.numel(), sparsity)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(sorted(CONFIGS)), pattern=patterns,
       sparsity=st.floats(0.0, 0.99, allow_nan=False), hidden=st.sampled_from(HIDDEN),
       intermediate=st.sampled_from(INTERMEDIATE), targets=st.sets(st.sampled_from(MODULES), max_size=3),
       excludes=st.sets(st.sampled_from(MODULES), max_size=2), data=st.data())
def test_accepted_configs_keep_their_promise(method, pattern, sparsity, hidden, intermediate, targets, excludes,
                                            data):
    selected = [m for m in (sorted(targets) or MODULES) if m not in excludes]
    kwargs = {"pattern": pattern, "target_modules": sorted(targets) or None, "exclude_modules": sorted(excludes) or None,
              "calibration": CalibrationConfig(num_samples=4)}
    nm = Pattern.parse(pattern)
    if method == "sparsegpt" and nm.is_nm and 128 % nm.m:  # its column blocks must hold whole groups
        kwargs["block_size"] = 16 * nm.m
    if pattern == "unstructured":
        kwargs["sparsity"] = sparsity
        chosen = data.draw(st.sets(st.sampled_from(selected), max_size=2)) if selected else set()
        kwargs["module_sparsity"] = {_full_name(m): data.draw(st.floats(0.0, 0.99, allow_nan=False))
                                     for m in sorted(chosen)} or None
    try:
        config = CONFIGS[method](**kwargs)
    except ValueError:
        pytest.fail(f"a valid config was rejected: {kwargs}")
    model = _model(hidden, intermediate)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = Pattern.parse(pattern)
    try:
        result = Pruner(model).prune(config, calibration_dataset=_batches(), progress=False)
    except ValueError as exc:  # the acceptable refusals, each before any weight changed
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        if not selected:
            assert "leave no module to prune" in str(exc) or "matches no Linear" in str(exc), exc
            return
        assert p.is_nm and "multiple of" in str(exc), exc
        assert any(w % p.m for w in (hidden, intermediate))
        return
    assert selected, "excluding every target must be refused"
    assert sorted(n.rsplit(".", 1)[1] for n in result.report["sparsity"]["per_module"]) == sorted(selected)
    _check_promise(model, result, config, pattern)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(sorted(CONFIGS)), seq_len=st.integers(4, 48), num_samples=st.integers(1, 6),
       packing=st.sampled_from(["concat", "pad", "auto"]), batch_size=st.integers(1, 4))
def test_text_calibration_keeps_the_promise(method, seq_len, num_samples, packing, batch_size, tokenizer, corpus):
    calibration = CalibrationConfig(num_samples=num_samples, seq_len=seq_len, packing=packing, batch_size=batch_size)
    config = CONFIGS[method](sparsity=0.5, calibration=calibration)
    model = _model(16, 24, vocab=len(tokenizer))
    result = Pruner(model, tokenizer).prune(config, calibration_dataset=corpus[:200], progress=False)
    _check_promise(model, result, config, "unstructured")
    provenance = result.report["calibration"]
    if config.statistics:  # the data actually read: as many samples as asked, none longer than seq_len
        assert provenance["num_samples"] == num_samples
        assert provenance["seq_len"] == seq_len


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    _model(16, 24, vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(sorted(CONFIGS)), pattern=patterns, sparsity=st.floats(0.0, 0.99, allow_nan=False),
       bad=st.sampled_from([None, "--block-size=0", "--sparsity=1.5", "--pattern=9:4", "--scope=column",
                            "--num-samples=0", "--no-such-flag"]))
def test_cli_runs_keep_the_promise_or_refuse_in_one_line(method, pattern, sparsity, bad, saved_tiny, tmp_path,
                                                          capsys):
    from hf_prune import PrunerConfig
    from hf_prune.cli import main

    out = tmp_path / f"out-{method}-{pattern.replace(':', 'of')}-{len(os.listdir(tmp_path))}"
    args = ["prune", saved_tiny, "--method", method, "--output", str(out), "--pattern", pattern, "--no-progress",
            "--no-checkpoint", "--calibration", "builtin:python-docs", "--num-samples", "2", "--seq-len", "16"]
    if pattern == "unstructured":
        args += ["--sparsity", repr(sparsity)]
    elif method == "sparsegpt" and 128 % Pattern.parse(pattern).m:
        args += ["--block-size", str(16 * Pattern.parse(pattern).m)]
    if bad is not None:
        args.append(bad)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse: an unknown flag or a value of the wrong type
        code = exc.code
    err = capsys.readouterr().err
    if code != 0:
        assert code == 2 and not out.exists(), (code, err)
        lines = [line for line in err.strip().splitlines() if line]
        assert lines and lines[-1].startswith(("hf-prune: error:", "hf-prune prune")), err
        assert "Traceback" not in err
        return
    config = PrunerConfig.from_pretrained(out)
    p = Pattern.parse(pattern)
    pruned = T.LlamaForCausalLM.from_pretrained(out)
    for name, module in pruned.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            if p.is_nm:
                assert nm_violations(module.weight, p.n, p.m) == 0
            else:
                zeros = int((module.weight == 0).sum())
                expected = (module.weight.shape[0] * prune_count(module.weight.shape[1], config.sparsity)
                            if getattr(config, "scope", "matrix") == "row"
                            else prune_count(module.weight.numel(), config.sparsity))
                assert zeros == expected, name


junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=6), st.lists(st.text(max_size=4), max_size=2),
                 st.dictionaries(st.text(max_size=4), st.floats(allow_nan=True), max_size=2))


FIELDS = ["sparsity", "pattern", "target_modules", "exclude_modules", "module_sparsity", "scope", "alpha", "block_size",
          "damp", "calibration"]


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(sorted(CONFIGS)), value=junk, data=st.data())
def test_rejected_configs_raise_our_own_errors(method, value, data):
    import dataclasses

    own = {f.name for f in dataclasses.fields(CONFIGS[method])}
    field = data.draw(st.sampled_from([f for f in FIELDS if f in own]))  # a field the method has
    try:
        config = CONFIGS[method](**{field: value})
    except (ValueError, TypeError) as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        origin = frames[-1].filename
        assert origin.startswith(HF_PRUNE), (origin, exc)
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
