"""SPP's math as pure tensor functions: the inverse-scale-space (ISS) updates, path records, read-off ranking and
budgets, and the training-free weight path (ours). No hooks, no models.

Notation (Ding et al., 2025; DessiLBI): alpha is the mask (trained by the task loss), z the Bregman / ISS
auxiliary variable, Gamma the sparse proxy whose support is the selected structure. An entry *enters* the path
when Gamma becomes non-zero; path time t is the cumulative learning rate.
"""

from __future__ import annotations

import math

import torch

from ..ria.ops import ria_scores

# --------------------------------------------------------------------------------------------------
# the search dynamics


def adam_step_size(lr: float, step: int, beta1: float, bias_correction: bool) -> float:
    """The z step eta_k: the released code reuses Adam's bias-corrected step lr / (1 - beta1^k)."""
    if not bias_correction:
        return lr
    return lr / (1.0 - beta1 ** max(1, step))


def released_update(z: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor, eta: float, kappa: float,
                    lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's step (``adamw_spp.py``): z += kappa * eta * (alpha_{k+1} - Gamma_k), then the
    non-negative shrinkage Gamma_{k+1} = max(z_{k+1} - lam, 0). Float32 in, new (z, Gamma) out."""
    z = z + (kappa * eta) * (alpha - gamma)
    return z, (z - lam).clamp_min(0.0)


def split_lbi_update(z: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor, eta: float, kappa: float,
                     lam: float, nu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """hf_prune's discretisation of Split LBI: z += eta * (alpha - Gamma) / nu, Gamma = kappa * max(z - lam, 0).

    It is not DessiLBI's update: ``alpha`` is the new mask alpha_{k+1} (after the optimizer step, which took the
    coupling gradient through Adam, so its scale is Adam-normalised), and the shrinkage is one-sided. DessiLBI
    soft-thresholds weights symmetrically; a mask is a non-negative scale, so (as in the released code) only the
    positive side can enter: a mask the loss drives negative is not "important"."""
    z = z + (eta / nu) * (alpha - gamma)
    return z, kappa * (z - lam).clamp_min(0.0)


def coupling_gradient(alpha: torch.Tensor, gamma: torch.Tensor, nu: float) -> torch.Tensor:
    """Gradient of the split coupling (1 / 2nu) ||alpha - Gamma||^2 with respect to alpha."""
    return (alpha - gamma) / nu


def record_entries(gamma: torch.Tensor, was_on: torch.Tensor, first_entry: torch.Tensor, last_exit: torch.Tensor,
                   t: float) -> torch.Tensor:
    """Update first-entry and last-exit times in place at path time ``t``; returns the new on-mask."""
    on = gamma != 0
    first_entry[on & torch.isinf(first_entry)] = t
    last_exit[was_on & ~on] = t
    return on


# --------------------------------------------------------------------------------------------------
# reading models off the path


def priority(first_entry: torch.Tensor, z: torch.Tensor, on_count: torch.Tensor, order: str) -> torch.Tensor:
    """Indices of the entries from most to least important (a fixed total order, so read-offs are nested).

    ``"first_entry"``: earlier entry first (never-entered last); ties by larger z (deeper past the threshold,
    or closer to it for entries that never entered), then by index. ``"on_count"``: the released ranking,
    more records on the path first; ties by first entry, then z, then index.
    """
    n = first_entry.numel()
    idx = torch.arange(n)
    perm = torch.argsort(-z.double(), stable=True)  # least significant key first
    perm = perm[torch.argsort(first_entry.double()[perm], stable=True)]
    if order == "on_count":
        perm = perm[torch.argsort(-on_count.double()[perm], stable=True)]
    elif order != "first_entry":
        raise ValueError(f"order={order!r} is not supported; choose 'first_entry' or 'on_count'.")
    return idx[perm]


def removal_count(costs_low_first: torch.Tensor, target: float) -> int:
    """How many of the removable entries (ordered least important first) to remove so that their total cost is
    the closest to ``target`` (ties: remove more). Monotone in ``target``, so read-offs are nested."""
    if costs_low_first.numel() == 0 or target <= 0:
        return 0
    cum = torch.cumsum(costs_low_first.double(), 0)
    r = int(torch.searchsorted(cum, torch.tensor(float(target), dtype=torch.float64), right=False))
    if r >= cum.numel():
        return cum.numel()
    below = float(cum[r - 1]) if r > 0 else 0.0
    above = float(cum[r])
    return r if target - below < above - target else r + 1


# --------------------------------------------------------------------------------------------------
# the training-free path (ours)


def iss_weight_path(weight: torch.Tensor, gram: torch.Tensor, *, alpha: float = 0.5, step_fraction: float = 0.01,
                    correction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-free inverse-scale-space path of the weights of one Linear layer (hf_prune's own method).

    The path starts at the simplest removal set, the dense layer, and weights leave it one event batch at a time.
    Each remaining weight accumulates removal pressure z_ij at a rate inversely proportional to its RIA score S_ij
    (relative importance x E[x_j^2]^(alpha/2)) times how much more its removal would now cost than on its own:

        dz_ij/dt = 1 / (S_ij * c_ij),   c_ij = E_ij(R) / E_ij(0) = 1 + 2 beta [R G]_ij / (W_ij G_jj),

    where G = E[x x^T] is the layer's input Gram on calibration data, R = W * removed the weights already gone and
    E_ij(R) = W_ij [R G]_ij + W_ij^2 G_jj / 2 the exact increase of the layer's output error 1/2 E||R x||^2 when
    W_ij is removed too; it leaves when z_ij reaches 1. With uncorrelated inputs (diagonal G) c = 1 and the
    removal order is exactly RIA's; with correlated inputs a weight whose removal would compound the error of
    removed weights slows down, one whose removal cancels it speeds up (c is floored at 1e-3). Integrating the
    pressure over the path (rather than ranking by the instantaneous cost, a greedy elimination) is what makes
    the correction robust. One pass gives every sparsity: keep the last (1 - s) weights to leave.

    ``correction`` (beta in [0, 1]) is the weight of the input correlations: the path computed with the Gram
    shrunk toward its diagonal, beta G + (1 - beta) diag(G) (a removed weight's own diagonal term never enters
    [R G]_ij for a remaining weight, so only the cross terms scale). beta = 0 gives RIA's order exactly; beta = 1
    trusts the calibration Gram fully. On trained weights the full correction swings c_ij far from 1 once many
    weights are gone (``../shared/models/pylm``, block 1, RIA's 50% removed: 9-13% of the remaining weights of
    q_proj / down_proj have c <= 0, floored at 1e-3 so they leave at once, and 1% have c > 3.5), and the path then
    removes large weights that only cancel the error of small ones: at 50% beta = 1 gave 1.8x RIA's layer error
    and perplexity 7.93 against RIA's 5.68 (``benchmarks/spp_diagnosis.py``).

    Between events the rates are constant, so removal times are exact except that up to ``step_fraction`` of the
    matrix may leave on one rate evaluation (one [out, in] x [in, in] product per batch).

    Returns ``(rank, curve)``: ``rank`` ([out, in], int32, a permutation; 0 = the weight that stays longest) and
    ``curve`` (101 path times at which 0%, 1%, ..., 100% of the weights had been removed).
    """
    w = weight.detach().to(torch.float32)
    g = gram.detach().to(torch.float32).to(w.device)
    rows, cols = w.shape
    if g.shape != (cols, cols):
        raise ValueError(f"gram must be [{cols}, {cols}] for a weight of shape {tuple(w.shape)}, got {tuple(g.shape)}.")
    diag = g.diagonal().clamp_min(0.0)
    scores = ria_scores(w, diag, alpha)
    own = w * diag.unsqueeze(0)  # W_ij G_jj
    safe_own = torch.where(own != 0, own, torch.ones_like(own))
    tiny = torch.finfo(torch.float32).tiny
    numel = w.numel()
    removed = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    z = torch.zeros(rows, cols, dtype=torch.float32, device=w.device)
    leave = torch.full((rows, cols), math.inf, dtype=torch.float64, device=w.device)
    batch = max(1, math.ceil(step_fraction * numel))
    t, left = 0.0, 0
    while left < numel:
        gone = torch.where(removed, w, torch.zeros_like(w))
        if correction:
            ratio = torch.where(own != 0, 1.0 + (2.0 * correction) * (gone @ g) / safe_own,
                                torch.ones_like(own)).clamp_min(1e-3)
        else:
            ratio = torch.ones_like(own)
        rate = 1.0 / (scores * ratio).clamp_min(tiny)  # a zero score (zero weight or dead input) leaves at once
        need = torch.where(removed, torch.full_like(z, math.inf), (1.0 - z) / rate)
        k = min(batch, numel - left)
        dt = float(need.flatten().kthvalue(k).values)
        out = ~removed & (need <= dt)
        leave[out] = t + need[out].double()
        z = torch.where(removed, z, z + dt * rate)
        removed |= out
        left += int(out.sum())
        t += dt
    # rank 0 = the last to leave; ties (same time) by higher RIA score, then index
    order = torch.argsort(-scores.flatten().double(), stable=True)
    order = order[torch.argsort(-leave.flatten()[order], stable=True)]
    rank = torch.empty(numel, dtype=torch.int32, device=w.device)
    rank[order] = torch.arange(numel, dtype=torch.int32, device=w.device)
    times = torch.sort(leave.flatten()).values
    picks = torch.clamp((torch.arange(101, device=w.device, dtype=torch.float64) / 100 * numel).ceil().long() - 1,
                        min=0)
    curve = times[picks].to(torch.float32)
    curve[0] = 0.0
    return rank.view(rows, cols).cpu(), curve.cpu()
