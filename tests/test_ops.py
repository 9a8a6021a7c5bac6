"""The pure math of each method against brute-force versions on small matrices."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_prune.errors import NonFiniteStatisticsError
from hf_prune.methods.magnitude.ops import magnitude_prune_mask
from hf_prune.methods.ria.ops import ria_scores
from hf_prune.methods.sparsegpt.ops import inverse_hessian_factor, sparsegpt_prune
from hf_prune.methods.wanda.ops import wanda_prune_mask, wanda_scores
from hf_prune.patterns import (
    Pattern,
    mask_from_scores,
    nm_prune_mask,
    nm_violations,
    prune_count,
    smallest_k_mask,
    smallest_k_per_row,
)

# ---------------------------------------------------------------------------------------------- masks


def test_pattern_parsing():
    assert Pattern.parse("unstructured") == Pattern("unstructured")
    assert Pattern.parse("2:4") == Pattern("nm", 2, 4) and Pattern.parse(" 4 : 8 ").sparsity == 0.5
    assert str(Pattern.parse("1:4")) == "1:4" and Pattern.parse("1:4").sparsity == 0.75
    for bad, words in [("4:4", "1 <= N < M"), ("5:4", "1 <= N < M"), ("0:4", "1 <= N < M"),
                       ("dense", "not understood"), ("2-4", "not understood")]:
        with pytest.raises(ValueError, match=words):
            Pattern.parse(bad)


def test_smallest_k_is_exact_even_with_ties():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 2.0]])
    for k in range(9):
        mask = smallest_k_mask(scores, k)
        assert int(mask.sum()) == k
        # every pruned score <= every kept score
        if 0 < k < 8:
            assert scores[mask].max() <= scores[~mask].min()
    per_row = smallest_k_per_row(scores, 2)
    assert per_row.sum(1).tolist() == [2, 2] and per_row[1, 2]


def test_prune_count_rounds_to_nearest():
    assert [prune_count(10, s) for s in (0.0, 0.04, 0.05, 0.5, 0.55, 0.99)] == [0, 0, 1, 5, 6, 10]


def test_nm_mask_matches_brute_force():
    torch.manual_seed(0)
    scores = torch.rand(6, 16)
    for n, m in [(2, 4), (4, 8), (1, 4), (3, 4)]:
        mask = nm_prune_mask(scores, n, m)
        for r, g in itertools.product(range(6), range(16 // m)):
            group = scores[r, g * m:(g + 1) * m]
            expected = set(group.argsort()[: m - n].tolist())
            assert set(torch.nonzero(mask[r, g * m:(g + 1) * m]).flatten().tolist()) == expected
        pruned = scores.masked_fill(mask, 0)
        assert nm_violations(pruned, n, m) == 0
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_prune_mask(torch.rand(2, 6), 2, 4)


# ---------------------------------------------------------------------------------------------- scores


def test_magnitude_per_matrix_brute_force():
    torch.manual_seed(1)
    W = torch.randn(6, 4)
    mask = magnitude_prune_mask(W, 0.5, Pattern.parse("unstructured"))
    expected = set(W.abs().flatten().argsort()[:12].tolist())
    assert set(torch.nonzero(mask.flatten()).flatten().tolist()) == expected


def test_wanda_scores_and_per_row_mask_brute_force():
    torch.manual_seed(2)
    W, sq = torch.randn(6, 4), torch.rand(4) * 5
    scores = wanda_scores(W, sq)
    for i, j in itertools.product(range(6), range(4)):
        assert scores[i, j] == pytest.approx(abs(W[i, j].item()) * sq[j].sqrt().item(), rel=1e-6)
    mask = wanda_prune_mask(W, sq, 0.5, Pattern.parse("unstructured"))
    for i in range(6):
        order = sorted(range(4), key=lambda j: abs(W[i, j].item()) * sq[j].sqrt().item())
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(order[:2])


def test_ria_scores_brute_force():
    torch.manual_seed(3)
    W, sq = torch.randn(6, 4), torch.rand(4) * 5
    for alpha in (0.5, 1.0):
        scores = ria_scores(W, sq, alpha)
        for i, j in itertools.product(range(6), range(4)):
            col = sum(abs(W[r, j].item()) for r in range(6))
            row = sum(abs(W[i, c].item()) for c in range(4))
            a = abs(W[i, j].item())
            expected = (a / col + a / row) * sq[j].sqrt().item() ** alpha
            assert scores[i, j] == pytest.approx(expected, rel=1e-5)
    # per-matrix threshold by default in RIA
    mask = mask_from_scores(ria_scores(W, sq), 0.5, Pattern.parse("unstructured"), scope="matrix")
    assert int(mask.sum()) == 12


# ---------------------------------------------------------------------------------------------- SparseGPT


def reference_sparsegpt(W, H, sparsity, n=0, m=0, block=128, damp=0.01):
    """The published algorithm, column by column (our own straightforward transcription of the paper)."""
    W = W.clone().float()
    rows, cols = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    live = (~dead).float()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
        mask = torch.zeros_like(W1, dtype=torch.bool)
        if not n:
            k = prune_count(rows * i2, sparsity) - prune_count(rows * i1, sparsity)
            mask = smallest_k_mask(W1 ** 2 / torch.diag(U1) ** 2 * live[i1:i2], k)
        for i in range(i2 - i1):
            if n and i % m == 0:
                s = W1[:, i:i + m] ** 2 / torch.diag(U1)[i:i + m] ** 2 * live[i1 + i:i1 + i + m]
                mask[:, i:i + m] = nm_prune_mask(s, n, m)
            w, d = W1[:, i], U1[i, i]
            q = w.clone()
            q[mask[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W


def correlated_layer(rows=24, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    scale = torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]  # features of very different size
    X = (torch.randn(tokens, cols, generator=g) @ mix) * scale
    W = torch.randn(rows, cols, generator=g)
    return W, X


@pytest.mark.parametrize("pattern,block", [("unstructured", 16), ("unstructured", 128), ("2:4", 16), ("4:8", 32),
                                           ("1:4", 128)])
def test_sparsegpt_equals_column_loop_reference(pattern, block):
    W, X = correlated_layer()
    H = 2 * X.T @ X / X.shape[0]
    p = Pattern.parse(pattern)
    sparsity = 0.6 if not p.is_nm else p.sparsity
    ours, mask, info = sparsegpt_prune(W, H, sparsity, p, block_size=block)
    ref = reference_sparsegpt(W, H, sparsity, p.n, p.m, block=block)
    assert torch.equal(ours == 0, ref == 0)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
    assert int(mask.sum()) == prune_count(W.numel(), sparsity)
    if p.is_nm:
        assert nm_violations(ours, p.n, p.m) == 0
    assert info["damp"] == 0.01 and info["obs_error"] > 0


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    W, X = correlated_layer(rows=32, cols=128, tokens=2048, seed=4)
    H = 2 * X.T @ X / X.shape[0]
    sq = (X ** 2).mean(0)
    for pattern in ("unstructured", "2:4"):
        p = Pattern.parse(pattern)

        def err(Wp):
            return float(((W - Wp) @ X.T).pow(2).sum())

        mag = W.masked_fill(magnitude_prune_mask(W, 0.5, p), 0)
        wan = W.masked_fill(wanda_prune_mask(W, sq, 0.5, p), 0)
        sgpt, _, _ = sparsegpt_prune(W, H, 0.5, p)
        assert err(sgpt) < err(wan) < err(mag), pattern


def test_sparsegpt_dead_inputs_pruned_first_within_budget():
    W, X = correlated_layer(rows=8, cols=32)
    X[:, :20] = 0  # 20 of 32 inputs never fire: more dead weights (160) than the budget (128)
    H = 2 * X.T @ X / X.shape[0]
    new, mask, info = sparsegpt_prune(W, H, 0.5, Pattern.parse("unstructured"), block_size=32)
    assert info["dead_inputs"] == 20
    assert int((new == 0).sum()) == 128  # exactly the target: dead columns beyond the budget are kept
    assert bool(mask[:, 20:].sum() == 0)  # every pruned weight is a dead one (they cost nothing)
    assert torch.equal(new[:, 20:], W[:, 20:])  # live weights untouched: dead inputs are decoupled in H^-1


def test_sparsegpt_dampening_fallback():
    H = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues -2 and 4: not positive definite
    with pytest.raises(NonFiniteStatisticsError, match="not positive definite"):
        inverse_hessian_factor(H, 0.01, max_damp=1.0)
    U, used, _ = inverse_hessian_factor(H, 0.01, max_damp=10.0)
    assert used == pytest.approx(10.0)
    assert torch.allclose(U.T @ U, torch.linalg.inv(H + 10.0 * torch.eye(2)), atol=1e-5)
