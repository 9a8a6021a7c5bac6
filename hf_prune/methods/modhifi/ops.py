"""ModHiFi (Kashyap et al.): the math on tensors, one Gram per layer. Pure functions, float64 inside.

Notation (research notes, part C.3). A layer ``y = W h`` with ``W`` [d, m] (``nn.Linear`` layout) reads the
``m`` MLP neurons ``h``; ``G = E[h h^T]`` [m, m] is their Gram over real tokens. The contribution of
neuron ``i`` to output ``c`` is ``A_ci = W[c, i] h_i``, so the paper's per-output component matrix is
``Q_c = diag(W[c]) G diag(W[c])`` and one ``G`` serves every output:

- output energy ``e_c = E[y_c^2] = (W G W^T)_cc``;
- singleton fidelity ``s_ci = FS_c({i}) = (G W^T)_ic^2 / (G_ii e_c)`` (the weight cancels: an uncentred R^2);
- saliency (App. D.2) ``R_ci = E<y_c, A_ci> = W[c, i] (G W^T)_ic``;
- the Cholesky "row norm" heuristic read literally: the row norms^2 of a Cholesky factor of
  ``Q + lam I`` are its diagonal, ``Q = sum_c Q_c = G o (W^T W)``, ``Q_ii = G_ii ||W[:, i]||^2``;
- the optimal compensation (Prop. 3.8) for all outputs at once, in weight space:
  ``W'[:, C] = W[:, C] + W[:, R] G[R, C] (G[C, C] + lam I)^-1`` (``R`` the removed neurons), which is the
  least-squares fit ``argmin E||W h - W'_C h_C||^2`` (exact for ``lam = 0``; the dampened form shrinks
  only the correction, towards no compensation) and equals the damped-Gram fit ``W Gd[:, C] Gd[C, C]^-1``
  with ``Gd = G + lam I``.

Neurons that never fire on the calibration data (``G_ii = 0``; then their whole row and column of ``G``
are zero) carry nothing: they are removed first and take no part in any solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import NonFiniteStatisticsError

SCORES = ("singleton_fidelity", "saliency", "cholesky_rownorm", "greedy_fidelity", "l2_norm")
PER_OUTPUT_SCORES = ("singleton_fidelity", "saliency", "cholesky_rownorm", "l2_norm")
_F64 = torch.float64


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(_F64)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0 (a component or output that carries no energy)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def dead_neurons(G: torch.Tensor) -> torch.Tensor:
    """Neurons that never fired on the calibration tokens (zero Gram diagonal), as a bool mask [m]."""
    return torch.diagonal(G) <= 0


def output_energy(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``e_c = (W G W^T)_cc`` for every output (float64, [d])."""
    W, G = _f64(W), _f64(G)
    return ((W @ G) * W).sum(1)


def component_terms(W: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``((Q_c 1)_i, (Q_c)_ii, e_c)`` for every output ``c`` and component ``i``, from one GEMM ``G W^T``.

    ``W`` is a Linear weight [d, m] (component = input feature) or a Conv2d weight [d, m, kh, kw]
    (component = input channel, its kernel slice ``w_ci`` of ``k = kh kw`` taps, ``G`` the Gram of the
    unfolded patches [m k, m k]): ``(Q_c)_ij = w_ci^T G[i-block, j-block] w_cj``. Returns float64
    ``[d, m]``, ``[d, m]``, ``[d]``."""
    W, G = _f64(W), _f64(G)
    d, m = W.shape[0], W.shape[1]
    k = W[0, 0].numel()
    Wr = W.reshape(d, m, k)
    GW = G @ Wr.reshape(d, m * k).t()  # [m k, d]
    q1 = torch.einsum("dmk,mkd->dm", Wr, GW.reshape(m, k, d))
    blocks = G.reshape(m, k, m, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [m, k, k]
    qii = torch.einsum("dmk,mkl,dml->dm", Wr, blocks, Wr)
    energy = q1.sum(1)
    return q1, qii, energy


def singleton_fidelity(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``s_ci = FS_c({i}) = (Q_c 1)_i^2 / ((Q_c)_ii 1^T Q_c 1)`` for every output and component ([d, m], float64);
    for a Linear ``(G W^T)_ic^2 / (G_ii e_c)``: one GEMM."""
    q1, qii, energy = component_terms(W, G)
    return _ratio(q1.pow(2), qii * energy.unsqueeze(1))


def singleton_fidelity_by_definition(A: torch.Tensor) -> torch.Tensor:
    """The paper's definition on samples, for one output: ``A`` [N, m] holds the contributions ``A_ci`` per
    sample; returns ``1 - E||y - alpha_i A_i||^2 / E||y||^2`` with ``alpha_i = E<y, A_i> / E||A_i||^2`` ([m])."""
    A = _f64(A)
    y = A.sum(1, keepdim=True)
    alpha = (A * y).sum(0) / A.pow(2).sum(0)
    residual = (y - A * alpha).pow(2).sum(0)
    return 1.0 - residual / y.pow(2).sum()


def saliency(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """App. D.2 saliency ``R_ci = E<y_c, A_ci> = (Q_c 1)_i``, for a Linear ``W[c, i] (G W^T)_ic`` ([d, m],
    float64; may be negative)."""
    return component_terms(W, G)[0]


def component_gram(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``Q = sum_c Q_c = G o (W^T W)`` ([m, m], float64)."""
    W, G = _f64(W), _f64(G)
    return G * (W.t() @ W)


def cholesky_rownorm(Q: torch.Tensor, lam: float) -> torch.Tensor:
    """The App. D.2 heuristic read literally: squared row norms of the Cholesky factor of ``Q + lam I``.

    Reference implementation (it factorises); for any SPD matrix this equals ``diag(Q) + lam`` exactly,
    which is what the pruning path uses (``neuron_scores``)."""
    Q = _f64(Q)
    L, info = torch.linalg.cholesky_ex(Q + lam * torch.eye(Q.shape[0], dtype=_F64, device=Q.device))
    if int(info) != 0:
        raise NonFiniteStatisticsError(f"Q + {lam:g} I is not positive definite; raise the dampening.")
    return L.pow(2).sum(1)


def per_output_scores(score: str, W: torch.Tensor, G: torch.Tensor | None) -> torch.Tensor:
    """Per-(output, component) scores [d, m] for HiFi-set selection; higher = more important. ``W`` is a
    Linear [d, m] or Conv2d [d, m, kh, kw] weight (see ``component_terms``)."""
    if score == "singleton_fidelity":
        return singleton_fidelity(W, G)
    if score == "saliency":
        return saliency(W, G)
    if score == "cholesky_rownorm":  # diag(Q_c): for a Linear W_ci^2 G_ii
        return component_terms(W, G)[1]
    if score == "l2_norm":
        return _f64(W).reshape(W.shape[0], W.shape[1], -1).pow(2).sum(2).sqrt()
    raise ValueError(f"score={score!r} has no per-output form; per-output scores: {', '.join(PER_OUTPUT_SCORES)}.")


SELECTIVITY_FLOOR = 1e-3


def selectivity(W: torch.Tensor, G_forget: torch.Tensor, G_remain: torch.Tensor) -> torch.Tensor:
    """Unlearning with data of the remaining classes (ours): per (output, component), the share of output
    ``c``'s energy that component ``i`` carries on the forget class, ``(Q_c)_ii / e_c``, over its share on
    the remaining classes (floored at ``SELECTIVITY_FLOOR``). High = the pair matters to the forget class far
    more than to the others ([d, m], float64)."""
    _, q_f, e_f = component_terms(W, G_forget)
    _, q_r, e_r = component_terms(W, G_remain)
    share_f = _ratio(q_f, e_f.unsqueeze(1).expand_as(q_f))
    share_r = _ratio(q_r, e_r.unsqueeze(1).expand_as(q_r))
    return share_f / (share_r + SELECTIVITY_FLOOR)


def neuron_scores(score: str, W: torch.Tensor, G: torch.Tensor | None,
                  producers: list[torch.Tensor] | tuple = ()) -> torch.Tensor:
    """One score per neuron [m] (float64), as a fraction of the layer's total, so that scores of different
    layers are comparable (``selection="global_ratio"``). Higher = more important. Dead neurons score 0
    except under ``"saliency"`` (signed) and ``"l2_norm"`` (data-free); callers put them first anyway.

    - ``singleton_fidelity``: the energy-weighted mean of ``s_ci`` over outputs,
      ``sum_c s_ci e_c / sum_c e_c = sum_c (G W^T)_ic^2 / G_ii / sum_c e_c`` (ours: the paper ranks per output);
    - ``saliency``: ``sum_c R_ci / sum_c e_c`` (the neuron's share of the output energy; sums to 1);
    - ``cholesky_rownorm``: ``Q_ii / tr(Q)`` (the dampening adds the same constant to every ``Q_ii``);
    - ``l2_norm``: the L2 norm of the neuron's whole group (producer rows and consumer column) over the
      layer's sum: the data-free structured baseline, not a ModHiFi score.
    """
    W = _f64(W)
    if score == "l2_norm":
        sq = W.pow(2).sum(0)
        for P in producers:
            sq = sq + _f64(P).pow(2).sum(1)
        norms = sq.sqrt()
        return _ratio(norms, norms.sum().expand_as(norms))
    G = _f64(G)
    if score == "singleton_fidelity":
        GW = G @ W.t()
        total = (W.t() * GW).sum()
        return _ratio(GW.pow(2).sum(1), torch.diagonal(G) * total)
    if score == "saliency":
        R = saliency(W, G).sum(0)
        return _ratio(R, R.sum().expand_as(R))
    if score == "cholesky_rownorm":
        q = torch.diagonal(G) * W.pow(2).sum(0)
        return _ratio(q, q.sum().expand_as(q))
    raise ValueError(f"score={score!r} is not a per-neuron score; choose one of {', '.join(SCORES)}.")


# --------------------------------------------------------------------------------------------- selection


def keep_top(scores: torch.Tensor, keep: int, dead: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (sorted) of the ``keep`` highest scores; dead neurons go first (are kept last). Ties are
    broken by index, so the result is deterministic."""
    m = scores.numel()
    if not 1 <= keep <= m:
        raise ValueError(f"cannot keep {keep} of {m} neurons: keep between 1 and {m}.")
    ranked = scores.to(_F64).clone()
    if dead is not None:
        ranked[dead] = -math.inf
    order = torch.sort(ranked, descending=True, stable=True).indices
    return order[:keep].sort().values


def union_keep(per_output: torch.Tensor, k: int, dead: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's rule (C.4 step 4): neurons in the top-``k`` (HiFi set) of at least one output.
    Returns the sorted kept indices; the number removed is not controlled."""
    d, m = per_output.shape
    if not 1 <= k <= m:
        raise ValueError(f"HiFi sets of {k} of {m} neurons: k must lie in [1, {m}].")
    ranked = per_output.to(_F64).clone()
    if dead is not None:
        ranked[:, dead] = -math.inf
    top = torch.topk(ranked, k, dim=1).indices
    member = torch.zeros(d, m, dtype=torch.bool, device=per_output.device)
    member.scatter_(1, top, True)
    kept = member.any(0)
    if dead is not None:
        kept &= ~dead
    if not bool(kept.any()):  # every neuron is dead: keep one so the layer still exists
        kept[0] = True
    return torch.nonzero(kept).flatten()


def global_keep_counts(layer_scores: list[torch.Tensor], remove: int, min_keep: int = 1) -> list[int]:
    """Remove the ``remove`` lowest scores over all layers (scores must be comparable across layers),
    each layer keeping at least ``min_keep``. Returns the kept count per layer.

    Exact under the cap: in a layer the neurons go in ascending order, so a neuron of rank >= width - min_keep
    can never be removed; the ``remove`` smallest of the others are the answer."""
    candidates, owners = [], []
    for layer, scores in enumerate(layer_scores):
        ascending = torch.sort(scores.to(_F64).cpu(), stable=True).values
        removable = max(0, scores.numel() - min_keep)
        candidates.append(ascending[:removable])
        owners.append(torch.full((removable,), layer, dtype=torch.long))
    pool = torch.cat(candidates) if candidates else torch.zeros(0, dtype=_F64)
    if remove > pool.numel():
        raise ValueError(f"cannot remove {remove} neurons while every layer keeps at least {min_keep}: at most "
                         f"{pool.numel()} can go; lower the sparsity.")
    chosen = torch.sort(pool, stable=True).indices[:remove]
    removed = torch.bincount(torch.cat(owners)[chosen], minlength=len(layer_scores)) if remove else \
        torch.zeros(len(layer_scores), dtype=torch.long)
    return [s.numel() - int(r) for s, r in zip(layer_scores, removed)]


# --------------------------------------------------------------------------------------------- compensation


def damping(G: torch.Tensor, damp: float, damp_mode: str = "relative") -> float:
    """The dampening added to the diagonal: ``damp * mean(live diag G)`` (relative) or ``damp`` (absolute,
    the paper's 1e-4 for replication)."""
    if damp_mode == "absolute":
        return float(damp)
    diag = torch.diagonal(_f64(G))
    live = diag[diag > 0]
    return float(damp) * (float(live.mean()) if live.numel() else 1.0)


def _cholesky_with_fallback(A: torch.Tensor, base: float, damped: torch.Tensor, damp: float, max_damp: float,
                            what: str) -> tuple[torch.Tensor, float]:
    """Cholesky of ``A + lam * diag(damped)`` where ``lam = base * (damp * 10^k) / damp``, raising the
    dampening tenfold until it factorises (up to ``max_damp``). Returns the factor and the damp used."""
    current = damp
    while True:
        lam = base * (current / damp) if damp > 0 else 0.0
        L, info = torch.linalg.cholesky_ex(A + torch.diag(damped * lam))
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            return L, current
        if damp <= 0 or current * 10 > max_damp * (1 + 1e-9):
            raise NonFiniteStatisticsError(
                f"{what}: the Gram of the kept neurons is not positive definite even with dampening {current:g}; "
                "the calibration inputs are degenerate (too few tokens, or NaN/inf activations). Give more "
                "calibration data or raise damp/max_damp.")
        current *= 10


@dataclass
class Compensation:
    """The result of ``least_squares_compensation`` (float64): the kept columns' new weights [d, |keep|], the
    bias change [d] (None without an intercept), the dampening used, and the residual
    ``E||W h - (W_keep h_C + bias_delta)||^2`` (absolute; divide by ``layer_energy`` for ``1 - FS``)."""

    weight: torch.Tensor
    bias_delta: torch.Tensor | None
    damp: float
    residual: float


def layer_energy(W: torch.Tensor, G: torch.Tensor) -> float:
    """``E||W h||^2 = tr(W G W^T)``."""
    W, G = _f64(W), _f64(G)
    return float(((W @ G) * W).sum())


def removed_energy(W: torch.Tensor, G: torch.Tensor, keep: torch.Tensor) -> float:
    """``E||W_R h_R||^2``: the error of dropping the neurons not in ``keep`` without compensation."""
    W, G = _f64(W), _f64(G)
    removed = torch.ones(G.shape[0], dtype=torch.bool, device=G.device)
    removed[torch.as_tensor(keep, dtype=torch.long, device=G.device)] = False
    WR = W[:, removed]
    return float(((WR @ G[removed][:, removed]) * WR).sum())


def least_squares_compensation(W: torch.Tensor, G: torch.Tensor, keep: torch.Tensor, *, damp: float = 0.01,
                               damp_mode: str = "relative", max_damp: float = 1.0,
                               mean: torch.Tensor | None = None, what: str = "layer") -> Compensation:
    """New weights of the kept columns after removing the others, by the closed-form least-squares update.

    ``keep``: sorted indices of the kept neurons. With ``mean = E[h]`` the fit also has an intercept (the
    layer's bias absorbs the removed neurons' mean contribution). One Cholesky of ``G[C, C]`` (``cholesky_ex``;
    dampening relative to the mean diagonal, raised tenfold on failure) and one multi-right-hand-side solve.

    The residual comes from the normal equations at no extra GEMM over the kept set: with ``r = W_R h_R``,
    ``z = [h_C; 1]``, ``B = E[z r^T]`` and ``(E[z z^T] + Lam) X = B`` (``X = Delta^T``),
    ``E||r - Delta z||^2 = E||r||^2 - <X, B> - sum_j Lam_j ||X_j||^2``.
    """
    W, G = _f64(W), _f64(G)
    m = G.shape[0]
    keep = torch.as_tensor(keep, dtype=torch.long, device=W.device)
    kept = torch.zeros(m, dtype=torch.bool, device=W.device)
    kept[keep] = True
    live = ~dead_neurons(G)
    C = torch.nonzero(kept & live).flatten()
    R = torch.nonzero(~kept).flatten()
    new = W[:, keep].clone()
    no_bias = torch.zeros(W.shape[0], dtype=_F64, device=W.device) if mean is not None else None
    lost = removed_energy(W, G, keep)
    if R.numel() == 0 or C.numel() == 0 or not bool(W[:, R].any()):
        return Compensation(new, no_bias, 0.0, lost)
    WR = W[:, R]
    A = G[C][:, C]
    rhs = G[C][:, R] @ WR.t()  # E[h_C r^T], r = W_R h_R: what the kept neurons must re-express
    damped = torch.ones(C.numel(), dtype=_F64, device=W.device)
    if mean is not None:
        mu = _f64(mean)
        A = torch.cat([torch.cat([A, mu[C].unsqueeze(1)], 1),
                       torch.cat([mu[C], torch.ones(1, dtype=_F64, device=W.device)]).unsqueeze(0)], 0)
        rhs = torch.cat([rhs, (WR @ mu[R]).unsqueeze(0)], 0)
        damped = torch.cat([damped, torch.zeros(1, dtype=_F64, device=W.device)])  # the intercept is not damped
    base = damping(G, damp, damp_mode)
    L, damp_used = _cholesky_with_fallback(A, base, damped, damp, max_damp, what)
    X = torch.cholesky_solve(rhs, L)  # [|C| (+1), d] = Delta^T
    lam = damped * (base * damp_used / damp if damp > 0 else 0.0)
    residual = lost - float((X * rhs).sum()) - float((lam.unsqueeze(1) * X.pow(2)).sum())
    position = torch.searchsorted(keep, C)  # where each live kept neuron sits among the kept columns
    new[:, position] += X[: C.numel()].t()
    bias_delta = X[-1] if mean is not None else None
    return Compensation(new, bias_delta, damp_used, max(residual, 0.0))


def reconstruction_error(W: torch.Tensor, G: torch.Tensor, keep: torch.Tensor, W_keep: torch.Tensor | None = None,
                         bias_delta: torch.Tensor | None = None, mean: torch.Tensor | None = None) -> float:
    """``1 - FS(C)``: ``E||W h - (W_keep h_C + bias_delta)||^2 / E||W h||^2`` from the Gram (0 for a layer whose
    output carries no energy). ``W_keep`` defaults to the uncompensated ``W[:, keep]``."""
    W, G = _f64(W), _f64(G)
    keep = torch.as_tensor(keep, dtype=torch.long, device=W.device)
    D = W.clone()
    D[:, keep] -= W[:, keep] if W_keep is None else _f64(W_keep)
    residual = ((D @ G) * D).sum()
    if bias_delta is not None:
        b = _f64(bias_delta)
        residual = residual - 2 * (b @ (D @ _f64(mean))) + b.pow(2).sum()
    energy = ((W @ G) * W).sum()
    return float(residual / energy) if float(energy) > 0 else 0.0


def subset_fidelity(W: torch.Tensor, G: torch.Tensor, keep: torch.Tensor) -> float:
    """``FS(C)`` of the paper summed over outputs, with the optimal (undamped) compensation."""
    return 1.0 - reconstruction_error(W, G, keep, least_squares_compensation(W, G, keep, damp=0.0).weight)


def greedy_fidelity(W: torch.Tensor, G: torch.Tensor, remove: int, *, damp: float = 0.01,
                    damp_mode: str = "relative", max_damp: float = 1.0,
                    what: str = "layer") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Backward elimination for the k-MFS problem (ours; the paper ranks singletons): remove, one at a time,
    the neuron whose removal raises the compensated reconstruction error least, given the neurons removed
    before it. With the damped Gram ``Gd`` and the current optimal weights ``V`` (``V = W`` at the start),
    removing ``j`` costs ``||V[:, j]||^2 / [Gd_S^-1]_jj``; ``V`` and ``Gd_S^-1`` are updated by rank-1 steps
    (O(m^2) each). Exact for each step, so a neuron that another one duplicates costs nothing.

    Dead neurons go first at zero cost. Returns ``(order [remove], cost [remove], damp_used)``: the removed
    neurons in removal order and the cumulative relative error (of the output energy) after each removal.
    """
    W, G = _f64(W), _f64(G)
    m = G.shape[0]
    if not 0 <= remove < m:
        raise ValueError(f"cannot remove {remove} of {m} neurons: remove between 0 and {m - 1}.")
    dead = dead_neurons(G)
    order = torch.nonzero(dead).flatten()[:remove].tolist()
    costs = [0.0] * len(order)
    left = remove - len(order)
    if left <= 0:
        return torch.tensor(order, dtype=torch.long), torch.tensor(costs, dtype=_F64), 0.0
    S = torch.nonzero(~dead).flatten()
    Gs = G[S][:, S]
    L, damp_used = _cholesky_with_fallback(Gs, damping(G, damp, damp_mode),
                                           torch.ones(S.numel(), dtype=_F64, device=W.device), damp, max_damp, what)
    Ginv = torch.cholesky_inverse(L)
    V = W[:, S].clone()
    energy = layer_energy(W, G)
    scale = 1.0 / energy if energy > 0 else 0.0
    index = S.clone()  # original neuron of each row/column of the working set
    active = torch.ones(S.numel(), dtype=torch.bool, device=W.device)
    total = 0.0
    for _ in range(left):
        cost = (V.pow(2).sum(0) / torch.diagonal(Ginv)).masked_fill(~active, math.inf)
        j = int(torch.argmin(cost))
        total += float(cost[j]) * scale
        row = Ginv[j].clone()
        V.addr_(V[:, j].clone(), row, alpha=-1.0 / float(row[j]))  # optimal re-fit without neuron j
        Ginv.addr_(row, row, alpha=-1.0 / float(row[j]))  # inverse of the Gram without neuron j (symmetric)
        active[j] = False
        order.append(int(index[j]))
        costs.append(total)
        if int((~active).sum()) * 4 > active.numel():  # compact the working set now and then
            index, V, Ginv = index[active], V[:, active], Ginv[active][:, active]
            active = torch.ones(index.numel(), dtype=torch.bool, device=W.device)
    return torch.tensor(order, dtype=torch.long), torch.tensor(costs, dtype=_F64), damp_used


def greedy_neuron_scores(W: torch.Tensor, G: torch.Tensor, *, damp: float = 0.01, damp_mode: str = "relative",
                         max_damp: float = 1.0, min_keep: int = 1, what: str = "layer") -> torch.Tensor:
    """Per-neuron scores from a full backward elimination: the cumulative relative error at the moment the
    neuron is removed (the last ``min_keep`` survivors score +inf). Comparable across layers: removing the
    lowest scores globally equalises the layers' reconstruction errors."""
    m = G.shape[0]
    order, cost, _ = greedy_fidelity(W, G, m - min_keep, damp=damp, damp_mode=damp_mode, max_damp=max_damp,
                                     what=what)
    scores = torch.full((m,), math.inf, dtype=_F64)
    scores[order] = cost
    return scores
