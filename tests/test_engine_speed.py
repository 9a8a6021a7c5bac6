"""The engine's speed work keeps results: one statistic per distinct input (shared by tensor identity, in every
family), SparseGPT's shared factor against a straightforward per-Linear reference kept here, the cheaper
triangular-inverse factor, in-place zeroing, and half-precision models with float32 statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, make_batches, make_model

from hf_prune import CalibrationConfig, Pruner, SparseGPTConfig, WandaConfig
from hf_prune.engine import walker
from hf_prune.engine.stats import LinearStats, StatsCollector
from hf_prune.engine.walker import calibration_mode
from hf_prune.methods.sparsegpt import config as sparsegpt_config
from hf_prune.methods.sparsegpt.ops import inverse_hessian_factor, lower_triangular_inverse, sparsegpt_prune
from hf_prune.models import get_family
from hf_prune.patterns import Pattern

CAL = CalibrationConfig(num_samples=8)


def reference_factor(hessian, damp, max_damp=1.0, factorization="cholesky_inverse", overwrite=False):
    """The reference code's factor, written out plainly: Cholesky, cholesky_inverse, Cholesky of the inverse."""
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    current = damp
    while True:
        L, info = torch.linalg.cholesky_ex(H + current * torch.mean(torch.diag(H)) * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, current, dead
        current *= 10


def per_linear_accumulator(self, name, module, x):
    """StatsCollector without sharing: every Linear accumulates its own statistics."""
    return self.stats[name]


def linear_names(model, *parts):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and any(p in n for p in parts)]


@pytest.mark.parametrize("family", FAMILIES)
def test_linears_reading_one_tensor_share_one_accumulator(family, tokenizer, corpus, one_thread):
    """Sharing is found by tensor identity in every family: the sharing groups are exactly the Linears that read
    the same input tensor, and each shared statistic equals what the Linear accumulates on its own."""
    model = make_model(family, vocab=len(tokenizer))
    batches = make_batches(family, tokenizer, corpus)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    inputs: dict[str, list] = {n: [] for n in linears}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs[n].append(args[0])) for n, m in linears.items()]
    kinds = frozenset({"gram", "sq_norm"})
    with calibration_mode(model), StatsCollector({n: (m, kinds) for n, m in linears.items()}) as collector:
        for batch in batches:
            collector.token_mask = None
            model(**batch)
    for h in handles:
        h.remove()
    groups: dict[int, set] = {}
    for n, st in collector.stats.items():
        groups.setdefault(id(st), set()).add(n)
    for names in groups.values():  # members read the same tensors, one by one
        first = sorted(names)[0]
        for other in names:
            assert len(inputs[other]) == len(inputs[first])
            assert all(a is b for a, b in zip(inputs[other], inputs[first])), (first, other)
    for n in linears:  # and no Linear reading the same tensors as another was left alone
        mates = {o for o in linears if o != n and len(inputs[o]) == len(inputs[n])
                 and all(a is b for a, b in zip(inputs[o], inputs[n]))}
        assert mates <= {o for o in linears if collector.stats[o] is collector.stats[n]}, n
    shared = [names for names in groups.values() if len(names) > 1]
    assert shared, f"{family}: q/k/v (and gate/up) read one tensor and should share"
    for n, m in linears.items():
        own = LinearStats(m.in_features, kinds)
        for x in inputs[n]:
            own.update(x)
        torch.testing.assert_close(collector.stats[n].xtx, own.xtx, rtol=0, atol=0)
        torch.testing.assert_close(collector.stats[n].sq_sum, own.sq_sum, rtol=0, atol=0)


def test_different_kinds_or_different_tensors_are_not_shared():
    a, b, c = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    x = torch.randn(5, 4)
    with StatsCollector({"a": (a, frozenset({"gram"})), "b": (b, frozenset({"sq_norm"})),
                         "c": (c, frozenset({"gram"}))}) as collector:
        for _ in range(2):
            collector.token_mask = None
            a(x), b(x), c(x.clone())
    assert collector.stats["a"] is not collector.stats["b"]  # other kinds
    assert collector.stats["a"] is not collector.stats["c"]  # an equal tensor, not the same one
    assert collector.stats["a"].tokens == collector.stats["c"].tokens == 10


def test_a_shared_input_that_stops_being_shared_is_an_error():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    x = torch.randn(5, 4)
    with StatsCollector({"a": (a, frozenset({"gram"})), "b": (b, frozenset({"gram"}))}) as collector:
        collector.token_mask = None
        a(x), b(x)
        assert collector.stats["a"] is collector.stats["b"]
        collector.token_mask = None
        a(x)
        with pytest.raises(RuntimeError, match="reads a different tensor"):
            b(x + 1)


@pytest.mark.parametrize("family", ["llama", "opt", "bert"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_with_shared_statistics_and_factor_matches_a_per_linear_reference(family, pattern, tokenizer, corpus,
                                                                                     monkeypatch, one_thread):
    """The engine (one Gram and one factor per distinct input, in-place zeroing) against the straightforward run:
    every Linear its own Gram and its own factor from the reference code's three factorisations."""
    base = make_model(family, vocab=len(tokenizer))
    batches = make_batches(family, tokenizer, corpus)
    fast = Pruner(copy.deepcopy(base), tokenizer)
    fast.prune(SparseGPTConfig(pattern=pattern, calibration=CAL), calibration_dataset=batches, progress=False)
    factors = []
    with monkeypatch.context() as m:
        m.setattr(StatsCollector, "_accumulator", per_linear_accumulator)
        m.setattr(sparsegpt_config, "inverse_hessian_factor",
                  lambda *a, **k: factors.append(1) or reference_factor(*a, **k))
        slow = Pruner(base, tokenizer)
        slow.prune(SparseGPTConfig(pattern=pattern, calibration=CAL), calibration_dataset=batches, progress=False)
    assert len(factors) == len(linear_names(base, "layer"))  # the reference really ran one factor per Linear
    fast_params = dict(fast.model.named_parameters())
    for name, ref in slow.model.named_parameters():
        got, ref = fast_params[name].detach(), ref.detach()
        assert torch.equal(got == 0, ref == 0), f"{name}: masks differ"
        assert float((got - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), name


def test_sparsegpt_computes_one_factor_per_distinct_input(tokenizer, corpus, monkeypatch, one_thread):
    model = make_model("llama", vocab=len(tokenizer))
    calls = []
    real = sparsegpt_config.inverse_hessian_factor
    monkeypatch.setattr(sparsegpt_config, "inverse_hessian_factor", lambda *a, **k: calls.append(1) or real(*a, **k))
    Pruner(model, tokenizer).prune(SparseGPTConfig(calibration=CAL),
                                   calibration_dataset=make_batches("llama", tokenizer, corpus), progress=False)
    blocks = model.config.num_hidden_layers
    assert len(calls) == 4 * blocks  # q/k/v, o, gate/up, down: 4 distinct inputs of 7 Linears per block


def test_triangular_inverse_factor_is_the_same_factor():
    g = torch.Generator().manual_seed(0)
    for n in (8, 136, 304):
        A = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
        L = torch.linalg.cholesky(A.t() @ A)
        torch.testing.assert_close(lower_triangular_inverse(L), torch.linalg.inv(L), rtol=1e-9, atol=1e-9)
        X = torch.randn(4 * n, n, generator=g) * torch.logspace(0, 2, n)  # ill-conditioned, like activations
        X[:, 3] = 0  # a dead input
        H = X.t() @ X / (4 * n)
        truth = reference_factor(H.double(), 0.01)[0]
        ref, damp_ref, dead_ref = inverse_hessian_factor(H, 0.01)
        tri, damp_tri, dead_tri = inverse_hessian_factor(H, 0.01, factorization="triangular_inverse")
        assert damp_ref == damp_tri and torch.equal(dead_ref, dead_tri) and bool(dead_tri[3])
        assert torch.equal(ref, reference_factor(H, 0.01)[0])  # the default is the reference, bit for bit
        err_ref = float((ref.double() - truth).abs().max())
        err_tri = float((tri.double() - truth).abs().max())
        assert err_tri <= 3 * err_ref + 1e-12, (n, err_tri, err_ref)  # as close to float64 as the reference
        W = torch.randn(8, n, generator=g)
        for pattern in ("unstructured", "2:4"):
            a = sparsegpt_prune(W, H, 0.5, Pattern.parse(pattern), factorization="triangular_inverse")[0]
            b = sparsegpt_prune(W, H, 0.5, Pattern.parse(pattern))[0]
            assert float((a - b).abs().max()) <= 1e-3 * float(b.abs().max())


def test_factorization_is_validated():
    with pytest.raises(ValueError, match="factorization"):
        SparseGPTConfig(factorization="lu")
    with pytest.raises(ValueError, match="factorization"):
        inverse_hessian_factor(torch.eye(3), 0.01, factorization="lu")


def test_a_nan_hessian_is_caught_by_the_factorisation():
    H = torch.eye(4)
    H[1, 2] = H[2, 1] = float("nan")
    with pytest.raises(Exception, match="not positive definite"):
        inverse_hessian_factor(H, 0.01, factorization="triangular_inverse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_prune_with_float32_statistics(dtype, tokenizer, corpus, one_thread):
    """Wanda on a half-precision model: the statistics are float32 sums of the half-precision activations, the kept
    weights are bit-identical to the original ones, and the mask is Wanda's on those float32 statistics."""
    model = make_model("llama", vocab=len(tokenizer)).to(dtype)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = make_batches("llama", tokenizer, corpus)
    names = linear_names(model, "layers.0.")
    modules = dict(model.named_modules())
    with calibration_mode(model), StatsCollector({n: (modules[n], frozenset({"sq_norm"})) for n in names}) as c:
        for batch in batches:  # the first block's statistics, before anything is pruned
            c.token_mask = batch["attention_mask"].bool()
            model(**batch)
    assert all(c.stats[n].sq_sum.dtype == torch.float32 and c.stats[n].input_dtype == dtype for n in names)
    Pruner(model, tokenizer).prune(WandaConfig(calibration=CAL), calibration_dataset=batches, progress=False)
    for n in names:
        weight, before = modules[n].weight, original[n + ".weight"]
        assert weight.dtype == dtype
        kept = weight != 0
        assert torch.equal(weight[kept], before[kept])
        from hf_prune.methods.wanda.ops import wanda_prune_mask
        expected = wanda_prune_mask(before.float(), c.stats[n].col_sq_mean, 0.5, Pattern.parse("unstructured"))
        assert torch.equal(~kept, expected | (before == 0)), n


def test_report_totals_reuse_the_counted_zeros_and_equal_a_full_count(tokenizer, corpus, one_thread):
    model = make_model("bert", vocab=len(tokenizer))  # its embeddings hold zeros of their own (the padding row)
    result = Pruner(model, tokenizer).prune(WandaConfig(calibration=CAL), calibration_dataset=make_batches(
        "bert", tokenizer, corpus), progress=False)
    totals = result.report["model_totals"]
    assert totals["parameters"] == sum(p.numel() for p in model.parameters())
    assert totals["zeros"] == sum(int((p == 0).sum()) for p in model.parameters())


def test_finiteness_checks_by_one_reduction_keep_their_answers():
    from hf_prune.engine.targets import check_finite
    from hf_prune.errors import NonFiniteWeightsError

    big = torch.nn.Linear(64, 64)
    with torch.no_grad():
        big.weight.fill_(3e38)  # finite entries whose sum overflows: not an error
    check_finite(big)
    with torch.no_grad():
        big.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="holds 1 NaN/inf"):
        check_finite(big)
    stats = LinearStats(4, frozenset({"gram"}))
    stats.update(torch.full((2, 4), 1e20))  # squares overflow to inf in float32: an error
    with pytest.raises(Exception, match="NaN/inf in the input Gram"):
        stats.check("layer")


@pytest.mark.parametrize("family", ["llama", "bert", "clip"])
def test_zeroth_order_scores_replaying_the_blocks_before_the_perturbed_one_are_the_same(family, tokenizer, corpus,
                                                                                        one_thread):
    """ECoFLaP's zeroth-order passes replay the recorded outputs of the blocks that ran before the perturbed unit's
    block: every score is bit-identical to full passes (real loss, label-free loss, two towers), with fewer block
    forwards."""
    from hf_prune.methods.ecoflap.losses import choose_loss
    from hf_prune.methods.ecoflap.scores import Unit, zeroth_order_scores

    model = make_model(family, vocab=len(tokenizer))
    batches = make_batches(family, tokenizer, corpus, n=4)
    family_spec = __import__("hf_prune.models", fromlist=["get_family"]).get_family(model)
    blocks = [b for stage in family_spec.stages(model) for b in stage.blocks(model)]
    units = [Unit(n, n, [m.weight]) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and any(m is x for b in blocks for x in b.modules())]
    loss = choose_loss(model, family_spec, batches[0])
    calls = []
    # the blocks' Linears count the block work actually done (a replayed block still passes through its __call__)
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for b in blocks for m in b.modules()
               if isinstance(m, torch.nn.Linear)]
    full = zeroth_order_scores(model, units, batches, loss, eps=1e-3, num_noise=1, seed=0, device=torch.device("cpu"),
                               progress=False)
    full_calls, calls[:] = len(calls), []
    fast = zeroth_order_scores(model, units, batches, loss, eps=1e-3, num_noise=1, seed=0, device=torch.device("cpu"),
                               progress=False, blocks=blocks)
    for h in handles:
        h.remove()
    assert fast == full
    assert len(calls) < 0.8 * full_calls, (len(calls), full_calls)
    assert all("forward" not in b.__dict__ for b in blocks)  # every block's own forward is back


# ---- exact overhead removals (issue 15 items 3-5): each keeps the values bit for bit ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_zero_masked_is_masked_fill_bit_for_bit(dtype, monkeypatch):
    from hf_prune import patterns

    monkeypatch.setattr(patterns, "ZERO_CHUNK", 64)  # several chunks, one of them partial
    g = torch.Generator().manual_seed(0)
    full = torch.randn(37, 40, generator=g).to(dtype)
    full[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 0.0]).to(dtype)
    full[1, :3] = torch.tensor([float("-inf"), -0.0, float("nan")]).to(dtype)
    for view in (lambda t: t, lambda t: t[:, 5:29]):  # contiguous, and rows of a wider matrix
        a, b = full.clone(), full.clone()
        mask = torch.rand(view(a).shape, generator=g) < 0.5
        mask[0, :2] = True
        view(a).masked_fill_(mask, 0)
        assert patterns.zero_masked_(view(b).clone(), mask, count=False) is None
        zeros = patterns.zero_masked_(view(b), mask)
        int_dtype = patterns._SAME_WIDTH_INT[dtype]
        assert torch.equal(a.view(int_dtype), b.view(int_dtype))  # +0.0 written, NaN/inf/-0.0 kept as they were
        assert zeros == view(b).numel() - int(torch.count_nonzero(view(b)))  # -0.0 counts as a zero, like the report


def test_zero_masked_falls_back_for_other_layouts():
    from hf_prune.patterns import zero_masked_

    t = torch.randn(6, 8)
    mask = torch.rand(8, 6) < 0.5
    expected = t.t().clone().masked_fill_(mask, 0)
    zeros = zero_masked_(t.t(), mask)  # last dimension not contiguous
    assert torch.equal(t.t(), expected) and zeros == int((expected == 0).sum())
    ints = torch.arange(12).view(3, 4)
    assert zero_masked_(ints, ints % 2 == 0) == 6 and ints.sum() == 1 + 3 + 5 + 7 + 9 + 11


def test_kth_smallest_is_kthvalue_with_ties_zeros_and_negatives():
    from hf_prune.patterns import kth_smallest, smallest_k_mask

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(5003, generator=g).to(dtype)
        x[::7] = 0.0
        x[::11] = -0.0
        x[3::13] = x[5]
        for k in (1, 2, 700, 2500, 5002, 5003):
            assert kth_smallest(x, k).item() == x.kthvalue(k).values.item()
            assert kth_smallest(x, k).dtype == dtype
    scores = (torch.rand(300, 128, generator=g) * 4).round()  # heavy ties: the first tied entries in memory order
    for k in (0, 1, 9000, 19200, 38400):
        mask = smallest_k_mask(scores, k)
        assert int(mask.sum()) == k
        if 0 < k < scores.numel():
            flat, m = scores.reshape(-1), mask.reshape(-1)
            threshold = flat.kthvalue(k).values
            assert bool((flat[m] <= threshold).all()) and bool((flat[~m] >= threshold).all())
            tied = torch.nonzero(flat == threshold).squeeze(1)
            taken = m[tied]
            assert not bool((~taken[:-1] & taken[1:]).any())  # ties taken as a prefix


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_leaf_gather_is_the_mask_product_formulation(pattern):
    """The leaf's system gathered from [I; U^T] equals M U^T + diag(1 - M) (the earlier formulation), so the
    solve and the whole prune give the same bits as a run that builds it by products."""
    from hf_prune.methods.sparsegpt import ops

    g = torch.Generator().manual_seed(2)
    X = torch.randn(400, 96, generator=g)
    X[:, 5] = 0  # a dead input
    U, _, _ = inverse_hessian_factor(2 * X.T @ X / 400, 0.01)
    W = torch.randn(150, 96, generator=g)
    for start, width in ((0, 8), (40, 4), (88, 8)):
        Ut = U[start:start + width, start:start + width].t()
        mask = torch.rand(150, width, generator=g) < 0.5
        mf = mask.to(torch.float32)
        A = mf.unsqueeze(2) * Ut.unsqueeze(0) + torch.diag_embed(1.0 - mf)
        expected = torch.linalg.solve_triangular(A, (mf * W[:, :width]).unsqueeze(2), upper=False).squeeze(2)
        got = ops._solve_leaf(W[:, :width], Ut, torch.eye(width), mask)
        assert torch.equal(got, expected)

    def reference_leaf(W, Ut, eye, mask):
        mf = mask.to(W.dtype)
        A = mf.unsqueeze(2) * Ut.unsqueeze(0) + torch.diag_embed(1.0 - mf)
        return torch.linalg.solve_triangular(A, (mf * W).unsqueeze(2), upper=False).squeeze(2)

    new = sparsegpt_prune(W, 2 * X.T @ X / 400, 0.5, Pattern.parse(pattern), block_size=32)
    original = ops._solve_leaf
    ops._solve_leaf = reference_leaf
    try:
        ref = sparsegpt_prune(W, 2 * X.T @ X / 400, 0.5, Pattern.parse(pattern), block_size=32)
    finally:
        ops._solve_leaf = original
    assert torch.equal(new[0], ref[0]) and torch.equal(new[1], ref[1]) and new[2] == ref[2]
    # a column-major weight (a Conv1D's [in, out] weight seen as [out, in]) gives the same bits
    column_major = sparsegpt_prune(W.t().contiguous().t(), 2 * X.T @ X / 400, 0.5, Pattern.parse(pattern), block_size=32)
    assert torch.equal(column_major[0], new[0]) and torch.equal(column_major[1], new[1])


@pytest.mark.parametrize("pattern,scope", [("unstructured", "row"), ("2:4", "row"), ("4:8", "row"),
                                           ("unstructured", "matrix")])
def test_masks_made_a_chunk_of_rows_at_a_time_equal_the_whole_matrix_mask(pattern, scope, monkeypatch):
    from hf_prune import patterns
    from hf_prune.methods.magnitude.ops import magnitude_prune_mask, magnitude_scores
    from hf_prune.methods.ria.ops import ria_prune_mask, ria_scores
    from hf_prune.methods.wanda.ops import wanda_prune_mask, wanda_scores

    g = torch.Generator().manual_seed(3)
    W = torch.randn(203, 64, generator=g)
    W[::5, ::3] = 0.0  # tied zero scores inside rows
    W[7] = W[7, 0]  # a row of ties
    norms = torch.rand(64, generator=g)
    norms[10] = 0.0  # a dead input
    p = Pattern.parse(pattern)
    whole = {"wanda": patterns.mask_from_scores(wanda_scores(W, norms), 0.5, p, scope=scope),
             "magnitude": patterns.mask_from_scores(magnitude_scores(W), 0.5, p, scope=scope),
             "ria": patterns.mask_from_scores(ria_scores(W, norms), 0.5, p, scope=scope)}
    for chunk in (64, 64 * 7, 10 ** 9):  # one row, seven rows (a partial last chunk), everything at once
        monkeypatch.setattr(patterns, "MASK_CHUNK", chunk)
        chunked = {"wanda": wanda_prune_mask(W, norms, 0.5, p, scope), "magnitude": magnitude_prune_mask(W, 0.5, p, scope),
                   "ria": ria_prune_mask(W, norms, 0.5, p, scope=scope)}
        for name in whole:
            assert torch.equal(chunked[name], whole[name]), (name, chunk)
    assert torch.equal(ria_scores(W, norms, rows=slice(20, 50), col_sums=W.abs().sum(0, keepdim=True)),
                       ria_scores(W, norms)[20:50])
    with pytest.raises(ValueError, match="col_sums"):
        ria_scores(W, norms, rows=slice(0, 5))


def test_layerwise_report_zeros_counted_while_zeroing_equal_a_recount(tokenizer, corpus, one_thread):
    from hf_prune.engine.report import count_zeros

    model = make_model("llama", vocab=len(tokenizer))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, :5] = 0.0  # zeros the mask keeps (ties) count too
    result = Pruner(model, tokenizer).prune(WandaConfig(sparsity=0.5, calibration=CalibrationConfig(num_samples=4)),
                                            calibration_dataset=corpus, progress=False)
    per_module = result.report["sparsity"]["per_module"]
    assert per_module
    for name, entry in per_module.items():
        assert entry["zeros"] == count_zeros(model.get_submodule(name).weight)


def test_per_row_mask_by_kth_value_is_the_topk_mask_with_ties():
    from hf_prune.patterns import smallest_k_per_row, smallest_k_per_row_topk

    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        s = torch.rand(60, 96, generator=g).to(dtype)
        s[::3, ::5] = 0.0  # ties below the k-th value
        s[7] = 0.5  # a whole row tied at its k-th value
        s[8, :60] = 0.25  # ties straddling the k-th value
        s[9] = torch.arange(96, dtype=dtype) % 4  # many small groups of ties
        for k in (0, 1, 17, 48, 95, 96):
            got = smallest_k_per_row(s, k)
            assert torch.equal(got, smallest_k_per_row_topk(s, k)), (dtype, k)
            assert bool((got.sum(1) == k).all())
    s = torch.rand(5, 8, generator=g, requires_grad=True)  # a tensor NumPy cannot read goes through topk
    assert torch.equal(smallest_k_per_row(s, 3), smallest_k_per_row_topk(s.detach(), 3))


def test_triangular_factor_rebuilds_its_freed_working_copy_on_a_retry(monkeypatch):
    """The triangular path frees its flipped copy of H once factored; a non-finite factor still retries with ten
    times the dampening on a fresh copy, and gets what a call with that dampening gets."""
    from hf_prune.methods.sparsegpt import ops

    g = torch.Generator().manual_seed(5)
    X = torch.randn(300, 100, generator=g)  # one leaf of the triangular inverse: one call per factorisation
    H = X.t() @ X / 300
    expected = inverse_hessian_factor(H, 0.1, factorization="triangular_inverse")
    real, calls = ops.lower_triangular_inverse, []

    def first_overflows(L):
        calls.append(1)
        out = real(L)
        return out.fill_(float("inf")) if len(calls) == 1 else out

    monkeypatch.setattr(ops, "lower_triangular_inverse", first_overflows)
    U, damp, dead = inverse_hessian_factor(H, 0.01, factorization="triangular_inverse")
    assert len(calls) == 2 and damp == pytest.approx(0.1)
    assert torch.equal(U, expected[0]) and torch.equal(dead, expected[2])


# ------------------------------------------------------------------ the capture's whole-stage forward on one row


def test_probe_batch_is_the_first_row_only_when_every_input_is_batch_first():
    ids = torch.arange(12).view(3, 4)
    probe = walker.probe_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "return_loss": True})
    assert torch.equal(probe["input_ids"], ids[:1]) and probe["attention_mask"].shape == (1, 4)
    assert probe["return_loss"] is True
    flattened = {"input_ids": ids, "pixel_values": torch.zeros(7, 5), "image_grid_thw": torch.ones(3, 3)}
    assert walker.probe_batch(flattened) is None  # Qwen2-VL's patches are not batch-first
    assert walker.probe_batch({"input_ids": ids[:1]}) is None  # one row already
    assert walker.probe_batch({"input_ids": ids, "extra": [1, 2, 3]}) is None
    assert walker.probe_batch({"input_ids": ids, "scale": torch.tensor(2.0)}) is None


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "t5"])
def test_capture_on_a_probe_row_keeps_every_cached_input_and_runs_the_whole_stage_on_one_row(
        family, tokenizer, corpus, monkeypatch):
    """The capture's whole-stage forward and the replay check run on the first row of the first batch; the cached
    inputs of every batch (hidden states, extra inputs, every block's own where they differ: Gemma 3's per-layer
    rotary tables and masks, T5's handed-on position bias) are exactly those of a capture without the probe, and
    the last block sees one row when the blocks share their inputs, every batch when they do not."""
    model = make_model(family, vocab=len(tokenizer)).eval()
    batches = make_batches(family, tokenizer, corpus, n=8, batch=4)
    family_spec = get_family(model)
    stages = family_spec.stages(model)
    stage = stages[0]
    blocks = stage.blocks(model)
    seen = []
    handle = blocks[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            probed = walker.capture_stage_inputs(model, stage, stages, batches, torch.device("cpu"))
            rows_seen = list(seen)
            monkeypatch.setattr(walker, "probe_batch", lambda batch: None)
            whole = walker.capture_stage_inputs(model, stage, stages, batches, torch.device("cpu"))
    finally:
        handle.remove()
    per_block = any(own for own in whole.own)
    probe_calls = [1, 1] if len(blocks) == 2 else [1]  # the real forward, and the replay check's run of block 1
    assert rows_seen == probe_calls + ([4] * len(batches) if per_block else [])
    assert per_block == (family != "llama")
    assert len(probed.hidden) == len(whole.hidden) == len(batches)
    for i in range(len(batches)):
        assert torch.equal(probed.hidden[i], whole.hidden[i])
        for index in range(len(blocks)):
            (a_args, a_kwargs), (b_args, b_kwargs) = probed.extra(i, index), whole.extra(i, index)
            assert not walker._differs((a_args, a_kwargs), (b_args, b_kwargs))
        assert (probed.masks[i] is None) == (whole.masks[i] is None)
