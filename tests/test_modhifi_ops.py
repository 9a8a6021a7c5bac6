"""ModHiFi's math against its definitions and brute force (research notes, part C.3), on small float64 problems."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from hf_prune.errors import NonFiniteStatisticsError
from hf_prune.methods.modhifi import ops

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(seed: int = 0, n: int = 500, m: int = 10, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(n, m, generator=g, dtype=F64) @ torch.randn(m, m, generator=g, dtype=F64) + 0.3
    W = torch.randn(d, m, generator=g, dtype=F64)
    return H, W, H.t() @ H / n


def test_delta_form_equals_weight_space_least_squares():
    H, W, G = _problem()
    keep = torch.tensor([0, 2, 3, 5, 7, 8])
    removed = torch.tensor([1, 4, 6, 9])
    damped = ops.least_squares_compensation(W, G, keep, damp=1.0, damp_mode="absolute", max_damp=1.0)
    assert damped.damp == 1.0 and damped.bias_delta is None
    # the residual from the normal equations equals the error measured with the weights it returns
    assert damped.residual == pytest.approx(
        ops.reconstruction_error(W, G, keep, damped.weight) * ops.layer_energy(W, G), rel=1e-9)
    new = ops.least_squares_compensation(W, G, keep, damp=0.0).weight  # the undamped solve is exact
    # the paper's per-output delta* (Prop. 3.8) with Q_c = diag(W_c) G diag(W_c): kept weights rescaled by delta
    for c in range(W.shape[0]):
        Q = torch.diag(W[c]) @ G @ torch.diag(W[c])
        delta = 1 + torch.linalg.solve(Q[keep][:, keep], Q[keep][:, removed] @ torch.ones(len(removed), dtype=F64))
        torch.testing.assert_close(delta * W[c, keep], new[c], rtol=1e-9, atol=1e-10)
    # ... which is the least-squares fit of the dense outputs from the kept inputs, on the samples
    fit = torch.linalg.lstsq(H[:, keep], H @ W.t()).solution.t()
    torch.testing.assert_close(new, fit, rtol=1e-9, atol=1e-10)
    # with an intercept (layers with a bias): the bias absorbs the removed neurons' mean contribution
    comp = ops.least_squares_compensation(W, G, keep, damp=0.0, mean=H.mean(0))
    new_b, bias = comp.weight, comp.bias_delta
    X = torch.cat([H[:, keep], torch.ones(len(H), 1, dtype=F64)], 1)
    fit = torch.linalg.lstsq(X, H @ W.t()).solution.t()
    torch.testing.assert_close(new_b, fit[:, :-1], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(bias, fit[:, -1], rtol=1e-9, atol=1e-10)
    # the reported 1 - fidelity is the relative error measured on the samples
    err = ops.reconstruction_error(W, G, keep, new_b, bias, H.mean(0))
    Y = H @ W.t()
    measured = (Y - H[:, keep] @ new_b.t() - bias).pow(2).sum() / Y.pow(2).sum()
    assert err == pytest.approx(float(measured), rel=1e-9)
    assert comp.residual / ops.layer_energy(W, G) == pytest.approx(err, rel=1e-9)
    damped = ops.least_squares_compensation(W, G, keep, damp=0.3, mean=H.mean(0))
    assert damped.residual == pytest.approx(ops.reconstruction_error(W, G, keep, damped.weight, damped.bias_delta,
                                                                     H.mean(0)) * ops.layer_energy(W, G), rel=1e-9)
    assert err < ops.reconstruction_error(W, G, keep)  # compensation never does worse than none
    assert ops.reconstruction_error(W, G, keep) == pytest.approx(
        ops.removed_energy(W, G, keep) / ops.layer_energy(W, G))


def test_singleton_fidelity_closed_form_equals_definition():
    H, W, G = _problem(1)
    s = ops.singleton_fidelity(W, G)
    for c in range(W.shape[0]):
        torch.testing.assert_close(s[c], ops.singleton_fidelity_by_definition(H * W[c]), rtol=1e-10, atol=1e-12)
    assert bool(((s >= 0) & (s <= 1)).all())
    # the same identity for a convolution: components are input channels (kernel slices), Gram of patches
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 3, 6, 6, generator=g, dtype=F64)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=F64)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    s = ops.singleton_fidelity(weight, patches.t() @ patches / len(patches))
    for c in range(4):
        A = torch.stack([F.conv2d(x[:, i:i + 1], weight[c:c + 1, i:i + 1], padding=1).flatten() for i in range(3)], 1)
        torch.testing.assert_close(s[c], ops.singleton_fidelity_by_definition(A), rtol=1e-10, atol=1e-12)


def test_saliency_and_scores_match_their_formulas():
    _, W, G = _problem(3)
    GW = G @ W.t()
    torch.testing.assert_close(ops.saliency(W, G), W * GW.t())
    torch.testing.assert_close(ops.per_output_scores("cholesky_rownorm", W, G), W.pow(2) * torch.diagonal(G))
    energy = ops.output_energy(W, G)
    per_neuron = ops.neuron_scores("singleton_fidelity", W, G)  # energy-weighted mean of s_ci over outputs
    torch.testing.assert_close(per_neuron, (ops.singleton_fidelity(W, G) * energy[:, None]).sum(0) / energy.sum())
    assert float(ops.neuron_scores("saliency", W, G).sum()) == pytest.approx(1.0)


def test_cholesky_rownorm_is_the_damped_diagonal():
    _, W, G = _problem(4)
    Q = ops.component_gram(W, G)
    torch.testing.assert_close(Q, sum(torch.diag(W[c]) @ G @ torch.diag(W[c]) for c in range(W.shape[0])))
    torch.testing.assert_close(ops.cholesky_rownorm(Q, 0.5), torch.diagonal(Q) + 0.5)


def test_naive_top_k_equals_brute_force_when_the_gram_is_diagonal():
    """Theorem 3.9: with pairwise-uncorrelated contributions the singleton top-k is the max-fidelity k-subset."""
    g = torch.Generator().manual_seed(5)
    m = 8
    G = torch.diag(torch.rand(m, generator=g, dtype=F64) + 0.1)
    W = torch.randn(3, m, generator=g, dtype=F64)
    s = ops.singleton_fidelity(W, G)
    for c, k in itertools.product(range(3), range(1, 5)):
        best = max(itertools.combinations(range(m), k),
                   key=lambda S: ops.subset_fidelity(W[c:c + 1], G, torch.tensor(S)))
        assert set(torch.topk(s[c], k).indices.tolist()) == set(best)
    # and it is a property of the diagonal: a correlated Gram breaks it on this problem
    G2 = G + 0.9 * torch.outer(torch.ones(m, dtype=F64), torch.ones(m, dtype=F64)) * G.diagonal().mean()
    s2 = ops.singleton_fidelity(W, G2)
    mismatch = 0
    for c, k in itertools.product(range(3), range(1, 5)):
        best = max(itertools.combinations(range(m), k),
                   key=lambda S: ops.subset_fidelity(W[c:c + 1], G2, torch.tensor(S)))
        mismatch += set(torch.topk(s2[c], k).indices.tolist()) != set(best)
    assert mismatch > 0


def test_fidelity_is_bounded_and_monotone():
    _, W, G = _problem(6)
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        order = torch.randperm(10, generator=g)
        values = [ops.subset_fidelity(W, G, order[:k].sort().values) for k in range(1, 11)]
        assert all(-1e-12 <= v <= 1 + 1e-12 for v in values)
        assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
        assert values[-1] == pytest.approx(1.0)


def test_dead_neurons_go_first_and_stay_out_of_the_solve():
    H, W, G = _problem(8)
    H[:, [2, 5]] = 0  # never fire
    G = H.t() @ H / len(H)
    assert ops.dead_neurons(G).nonzero().flatten().tolist() == [2, 5]
    scores = ops.neuron_scores("saliency", W, G)
    assert ops.keep_top(scores, 8, ops.dead_neurons(G)).tolist() == [0, 1, 3, 4, 6, 7, 8, 9]
    keep = torch.tensor([0, 1, 2, 3, 4, 6, 7])  # a dead neuron kept: its weights are left alone
    new = ops.least_squares_compensation(W, G, keep, damp=0.01).weight
    torch.testing.assert_close(new[:, 2], W[:, 2])
    order, cost, _ = ops.greedy_fidelity(W, G, 3)
    assert order[:2].tolist() == [2, 5] and cost[:2].tolist() == [0.0, 0.0]


def test_dampening_rises_when_the_gram_is_not_positive_definite():
    G = torch.tensor([[1.0, 1.5, 0.0], [1.5, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)  # indefinite (float noise)
    W = torch.ones(2, 3, dtype=F64)
    damp = ops.least_squares_compensation(W, G, torch.tensor([0, 1]), damp=0.01, max_damp=10.0).damp
    assert damp == pytest.approx(1.0)  # 0.01 and 0.1 of the mean diagonal fail; 1.0 factorises
    with pytest.raises(NonFiniteStatisticsError, match="not positive definite even with dampening 0.1"):
        ops.least_squares_compensation(W, G, torch.tensor([0, 1]), damp=0.01, max_damp=0.1)


def test_greedy_fidelity_tracks_the_compensated_error_and_finds_duplicates():
    H, W, _ = _problem(9, m=8)
    H = torch.cat([H, H[:, [1, 4, 6]]], 1)  # neurons 8, 9, 10 duplicate 1, 4, 6
    W = torch.cat([W, torch.randn(W.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(1))], 1)
    G = H.t() @ H / len(H)
    order, cost, _ = ops.greedy_fidelity(W, G, 5, damp=1e-9)
    assert cost[2] < 1e-8 < cost[3]  # three removals cost nothing: one copy of each duplicated pair
    pair = {1: 0, 8: 0, 4: 1, 9: 1, 6: 2, 10: 2}
    assert sorted(pair.get(int(i), -1) for i in order[:3]) == [0, 1, 2]
    keep = torch.tensor(sorted(set(range(11)) - set(order.tolist())))
    new = ops.least_squares_compensation(W, G, keep, damp=1e-9).weight
    assert float(cost[-1]) == pytest.approx(ops.reconstruction_error(W, G, keep, new), rel=1e-5, abs=1e-12)
    # per-neuron scores for global budgets: cumulative error at removal, survivors last
    scores = ops.greedy_neuron_scores(W, G, damp=1e-9)
    assert int(torch.isinf(scores).sum()) == 1 and bool((torch.sort(scores).values.diff() >= 0).all())


def test_global_budget_and_union_selection():
    a = torch.tensor([0.1, 0.5, 0.2, 0.9])
    b = torch.tensor([0.05, 0.3, 0.6])
    assert ops.global_keep_counts([a, b], 3) == [2, 2]  # 0.05, 0.1, 0.2 go
    assert ops.global_keep_counts([a, b], 5) == [1, 1]  # every layer keeps at least one neuron
    with pytest.raises(ValueError, match="at most 5 can go"):
        ops.global_keep_counts([a, b], 6)
    # brute force over every split of the budget
    g = torch.Generator().manual_seed(3)
    layers = [torch.rand(5, generator=g), torch.rand(4, generator=g), torch.rand(6, generator=g)]
    for remove in range(0, 13):
        counts = ops.global_keep_counts(layers, remove)
        best = min((sum(float(torch.sort(s).values[:r].sum()) for s, r in zip(layers, split)), split)
                   for split in itertools.product(*(range(len(s)) for s in layers)) if sum(split) == remove)[1]
        assert counts == [len(s) - r for s, r in zip(layers, best)]
    per_output = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.0, 0.7, 0.2, 0.9]])
    assert ops.union_keep(per_output, 2).tolist() == [0, 1, 3]  # neuron 2 is in no output's top-2
    assert ops.union_keep(per_output, 1, dead=torch.tensor([True, False, False, False])).tolist() == [1, 3]


def test_collector_reads_conv_patches_and_means():
    """The engine's statistics of a Conv2d are those of its im2col patches; the "sum" kind gives E[x]."""
    from hf_prune.engine.stats import StatsCollector

    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1)
    linear = torch.nn.Linear(5, 2)
    x = torch.randn(6, 3, 7, 7)
    h = torch.randn(6, 9, 5)
    with StatsCollector({"conv": (conv, frozenset({"gram", "sum"})), "lin": (linear, frozenset({"sum"}))},
                        torch.float64) as collector:
        conv(x)
        collector.token_mask = torch.arange(9).expand(6, 9) < 4  # padding excluded for token inputs
        linear(h)
    patches = F.unfold(x.double(), 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
    conv_stats = collector.stats["conv"]
    assert conv_stats.tokens == 6 * 16
    torch.testing.assert_close(conv_stats.gram, patches.t() @ patches / len(patches))
    torch.testing.assert_close(conv_stats.mean, patches.mean(0))
    torch.testing.assert_close(collector.stats["lin"].mean, h[:, :4].double().reshape(-1, 5).mean(0))
    with pytest.raises(ValueError, match="only groups=1"):
        StatsCollector({"dw": (torch.nn.Conv2d(4, 4, 3, groups=4), frozenset({"gram"}))})
