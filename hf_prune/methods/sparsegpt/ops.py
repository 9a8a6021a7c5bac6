"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with lazy column-block updates. Pure tensor math.

Given a weight W [out, in] and the layer Hessian H = 2 E[x x^T] [in, in]:

1. inputs that never fire (diag H = 0) get H_jj = 1 and score zero, so their weights are pruned
   first; unlike the reference code, dead columns beyond the budget are kept, not zeroed, so the
   achieved sparsity stays exactly the target (a dead input is decoupled in H^-1: pruning its
   weight moves no other weight);
2. H is dampened by ``damp`` x mean(diag H) on the diagonal; if its Cholesky factorisation fails the
   dampening is raised tenfold (up to ``max_damp``) and the attempt is recorded;
3. U = upper Cholesky factor of H^-1;
4. columns are processed in blocks of ``block_size``: the unstructured mask of a block is chosen at
   its start from w^2 / U_jj^2 (exactly the block's share of the budget, so the matrix total is exact);
   N:M masks are chosen per group of M columns from the weights as already updated by the columns
   before it; the pruned weights' errors are propagated to the remaining columns.

The within-block sequential update is solved without a per-column Python loop: for one row with prune
set P the errors e solve the lower-triangular system (M U^T + I - M) e = M w. A block is split in two
halves recursively; the left half's errors reach the right half through one GEMM, and leaves of a few
columns are solved for all rows at once with a batched triangular solve. This is exact (the same
arithmetic as the column loop up to float rounding).
"""

from __future__ import annotations

import torch

from ...errors import NonFiniteStatisticsError
from ...patterns import Pattern, nm_prune_mask, prune_count, smallest_k_mask, zero_masked_

UNSTRUCTURED_LEAF = 8


TRIANGULAR_LEAF = 128  # below this size a triangular inverse is one triangular solve against the identity


def lower_triangular_inverse(L: torch.Tensor) -> torch.Tensor:
    """The inverse of a lower-triangular matrix with a non-zero diagonal, by halves:
    ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``, so most of the work is two matrix products
    (BLAS-3 at full speed) instead of a triangular solve against a dense identity."""
    n = L.shape[0]
    if n <= TRIANGULAR_LEAF:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    out = torch.zeros_like(L)
    A_inv = lower_triangular_inverse(L[:h, :h])
    C_inv = lower_triangular_inverse(L[h:, h:])
    out[:h, :h] = A_inv
    out[h:, h:] = C_inv
    torch.mm(torch.mm(C_inv, L[h:, :h]), A_inv, out=out[h:, :h])
    out[h:, :h].neg_()
    return out


FACTORIZATIONS = ("cholesky_inverse", "triangular_inverse")


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, max_damp: float = 1.0,
                           factorization: str = "cholesky_inverse",
                           overwrite: bool = False) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Upper Cholesky factor of the dampened inverse Hessian, the dampening used, and the dead inputs.

    Returns ``(U, damp_used, dead)`` where ``U^T U = (H + damp_used * mean(diag H) * I)^-1``.

    ``factorization``:

    - ``"cholesky_inverse"`` (default): the reference code's Cholesky of H, ``cholesky_inverse``, Cholesky of the
      inverse: three O(n^3) LAPACK calls, bit for bit what earlier versions computed.
    - ``"triangular_inverse"``: one Cholesky and one triangular inverse. With ``J`` the exchange matrix and
      ``J H J = L L^T``, ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and ``J L^-1 J`` is upper triangular with a positive
      diagonal, i.e. the same factor; about 1.6x cheaper. In float32 it differs from the default by rounding (about
      1e-6 of the factor, as far from a float64 factor as the default is), which the sequential solve can turn into
      different choices between nearly tied weights, so its masks are not bit-identical to the default's.

    Either way the dampening is written on the diagonal of the one working copy (no identity matrix), a matrix that
    is not positive definite (or holds NaN) is caught by the factorisation's own error code, and the factor's
    finiteness is checked by one reduction. ``overwrite=True``: ``hessian`` is a temporary the caller gives up, used
    as the working copy of the default factorisation (one n x n buffer less); its contents are then undefined.
    """
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization={factorization!r} is not known; choose one of {', '.join(FACTORIZATIONS)}.")
    reverse = factorization == "triangular_inverse"
    H = hessian.flip(0, 1) if reverse else (hessian if overwrite else hessian.clone())  # the one working copy
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    base = diag.clone()
    mean_diag = torch.mean(base)
    current = damp
    while True:
        if H is None:  # the triangular path gave its working copy up; a retry makes it again
            H = hessian.flip(0, 1)
            diag = H.diagonal()
        diag.copy_(base).add_(current * mean_diag)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            if reverse:
                # free each n x n buffer once it is read: the flipped copy, then the factor, then its inverse (three
                # at most with the caller's Hessian, as the default path)
                H = diag = None
                inverse = lower_triangular_inverse(L)
                del L
                U = inverse.flip(0, 1)
                del inverse
            else:
                inverse = torch.cholesky_inverse(L)
                del L  # at most three n x n buffers at once: H, the inverse, its factor
                U, info = torch.linalg.cholesky_ex(inverse, upper=True)
                del inverse
            # one reduction; a sum can overflow where no entry does, so only then look at every entry
            if int(info) == 0 and (bool(torch.isfinite(U.sum())) or bool(torch.isfinite(U).all())):
                return U, current, dead.flip(0) if reverse else dead
        if current * 10 > max_damp + 1e-12:
            raise NonFiniteStatisticsError(
                f"the Hessian is not positive definite even with dampening {current:g} x mean(diag H); the "
                "calibration inputs are degenerate (too few samples, or NaN/inf activations).")
        current *= 10


def _solve_leaf(W: torch.Tensor, Ut: torch.Tensor, eye: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Errors of a few columns, all rows at once: (M U^T + I - M) e = M w, lower triangular per row.

    ``Ut``: the leaf's U^T; ``eye``: the identity of its size; ``mask``: bool [rows, width]. A row's system has
    U^T's row where the column is pruned and the identity's row elsewhere: the same values as
    ``M U^T + diag(1 - M)``, gathered as rows of ``[I; U^T]`` (one copy instead of two products and a sum)."""
    rows, width = mask.shape
    index = mask.to(torch.long).mul_(width).add_(torch.arange(width, device=mask.device))
    A = torch.cat([eye, Ut]).index_select(0, index.reshape(-1)).view(rows, width, width)  # mask may be column-major
    return torch.linalg.solve_triangular(A, (mask * W).unsqueeze(2), upper=False).squeeze(2)


def obs_scores(W: torch.Tensor, U: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """SparseGPT's saliency w^2 / [H^-1]_jj (via U_jj^2), zero for inputs that never fire."""
    return _scores(W, torch.diag(U).pow(2), live)


def _scores(W: torch.Tensor, diag_sq: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``obs_scores`` from U's squared diagonal, computed once per matrix."""
    return W.pow(2) / diag_sq.unsqueeze(0) * live.unsqueeze(0)


def obs_channel_scores(W: torch.Tensor, hessian: torch.Tensor, damp: float, max_damp: float = 1.0,
                       factorization: str = "cholesky_inverse") -> torch.Tensor:
    """The OBS saliency w^2 / [H^-1]_jj with the full inverse's diagonal (``U^T U = H^-1``: column norms of U),
    zero for inputs that never fire. Unlike ``obs_scores`` it does not depend on the column order, so it can
    choose a channel permutation before the sequential solve."""
    U, _, dead = inverse_hessian_factor(hessian, damp, max_damp, factorization)
    return W.pow(2) / U.pow(2).sum(dim=0).unsqueeze(0) * (~dead).to(W.dtype).unsqueeze(0)


def _solve(W: torch.Tensor, U: torch.Tensor, diag_sq: torch.Tensor, live: torch.Tensor, pattern: Pattern,
           leaf: int, E: torch.Tensor, mask: torch.Tensor, choose: bool, eyes: dict) -> None:
    """Errors and prune mask of a block whose columns are processed left to right, written into ``E`` and the bool
    ``mask`` ([rows, b] views of buffers allocated once). ``choose``: N:M, each leaf is one group whose mask is
    chosen here from the weights as updated so far; otherwise ``mask`` is given. ``eyes``: the identity of each leaf
    width, made once per matrix."""
    width = W.shape[1]
    if width <= leaf:
        if choose:
            mask.copy_(nm_prune_mask(_scores(W, diag_sq, live), pattern.n, pattern.m))
        eye = eyes.get(width)
        if eye is None:
            eye = eyes[width] = torch.eye(width, dtype=W.dtype, device=W.device)
        E.copy_(_solve_leaf(W, U.t(), eye, mask))
        return
    half = leaf * ((width // leaf + 1) // 2)
    _solve(W[:, :half], U[:half, :half], diag_sq[:half], live[:half], pattern, leaf, E[:, :half], mask[:, :half],
           choose, eyes)
    W_right = W[:, half:] - E[:, :half] @ U[:half, half:]
    _solve(W_right, U[half:, half:], diag_sq[half:], live[half:], pattern, leaf, E[:, half:], mask[:, half:], choose,
           eyes)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor | None, sparsity: float, pattern: Pattern, *,
                    block_size: int = 128, damp: float = 0.01, max_damp: float = 1.0,
                    factor: tuple[torch.Tensor, float, torch.Tensor] | None = None,
                    factorization: str = "cholesky_inverse") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune ``weight`` [out, in] with SparseGPT; returns (new weight, prune mask, info).

    ``factor``: ``inverse_hessian_factor(hessian, damp, max_damp)`` when already computed (Linears reading the same
    input share one Hessian, hence one factor); ``hessian`` may then be None. ``factorization``: see
    ``inverse_hessian_factor``.

    ``info``: ``damp`` (the dampening that worked), ``dead_inputs``, and ``obs_error`` (SparseGPT's own
    estimate of the layer's squared reconstruction error, sum of (w - q)^2 / U_jj^2 / 2).
    """
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    square = tuple((hessian if factor is None else factor[0]).shape)
    if square != (cols, cols):
        raise ValueError(f"Hessian shape {square} does not match weight shape {tuple(W.shape)}.")
    if pattern.is_nm and block_size % pattern.m:
        raise ValueError(f"block_size={block_size} must be a multiple of M={pattern.m} for pattern {pattern}.")
    if factor is None:
        factor = inverse_hessian_factor(hessian.to(torch.float32), damp, max_damp, factorization)
    U, damp_used, dead = factor
    live = (~dead).to(W.dtype)
    diag_sq = torch.diag(U).pow(2)
    leaf = pattern.m if pattern.is_nm else UNSTRUCTURED_LEAF
    prune = torch.zeros_like(W, dtype=torch.bool)
    E_buffer = torch.empty(rows, min(block_size, cols), dtype=W.dtype, device=W.device)  # one block's errors
    eyes: dict = {}
    total_error = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        E, block_prune = E_buffer[:, :i2 - i1], prune[:, i1:i2]
        if not pattern.is_nm:
            # this block's exact share of the matrix budget (cumulative rounding keeps the total exact)
            k = prune_count(rows * i2, sparsity) - prune_count(rows * i1, sparsity)
            block_prune.copy_(smallest_k_mask(_scores(W1, diag_sq[i1:i2], live[i1:i2]), k))
        _solve(W1, U1, diag_sq[i1:i2], live[i1:i2], pattern, leaf, E, block_prune, pattern.is_nm, eyes)
        zero_masked_(W1.sub_(E @ U1), block_prune, count=False)
        W[:, i2:].addmm_(E, U[i1:i2, i2:], alpha=-1.0)  # the lazy trailing update, no temporary
        total_error += float(E.pow(2).sum()) / 2
    return W, prune, {"damp": damp_used, "dead_inputs": int(dead.sum()), "obs_error": total_error}
