"""Sparsity patterns and mask construction: pure tensor functions, no hooks, no models.

Convention: a *prune mask* is a bool tensor shaped like the weight, ``True`` where the weight is removed.
``N:M`` always means *keep N of every M consecutive weights along the input dimension* (NVIDIA's
meaning); 2:4 and 4:8 therefore remove exactly half of every group.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` or ``N:M`` (keep N of every M consecutive inputs)."""

    kind: str  # "unstructured" | "nm"
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: "str | Pattern") -> "Pattern":
        if isinstance(text, Pattern):
            return text
        if not isinstance(text, str):
            raise ValueError(f"pattern must be a string such as 'unstructured' or '2:4', got {text!r}.")
        if text.strip().lower() == "unstructured":
            return cls("unstructured")
        match = _NM.match(text)
        if not match:
            raise ValueError(
                f"pattern={text!r} is not understood; use 'unstructured' or 'N:M' (keep N of every M "
                "consecutive inputs), e.g. '2:4' or '4:8'.")
        n, m = int(match.group(1)), int(match.group(2))
        if m < 2 or n < 1 or n >= m:
            raise ValueError(
                f"pattern={text!r} is invalid: N:M keeps N of every M inputs, so it needs 1 <= N < M "
                f"(got N={n}, M={m}); e.g. '2:4' or '4:8'.")
        return cls("nm", n, m)

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    @property
    def sparsity(self) -> float:
        """The fraction an N:M pattern removes (``1 - N/M``)."""
        return 1.0 - self.n / self.m if self.is_nm else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def prune_count(numel: int, sparsity: float) -> int:
    """Number of weights to remove out of ``numel`` for ``sparsity`` (nearest integer, halves up)."""
    return min(numel, max(0, int(math.floor(sparsity * numel + 0.5))))


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest value (1-based) of a 1-D tensor, as a 0-d tensor on its device.

    A selection does no arithmetic, so every algorithm returns the same value; on the CPU NumPy's introselect
    (``np.partition``) is used, which at a SparseGPT block (2752 x 128 scores) is about 50x faster than
    ``torch.kthvalue`` (that copies the input and also tracks indices)."""
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64) and not flat.requires_grad:
        values = flat.contiguous().numpy()
        return torch.tensor(np.partition(values, k - 1)[k - 1], dtype=flat.dtype)
    return flat.kthvalue(k).values


def smallest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune mask with exactly ``k`` True entries at the ``k`` smallest scores of the whole tensor.

    Uses a k-th value threshold plus explicit tie filling (the first tied entries in memory order), so it needs no
    full argsort of a large matrix.
    """
    flat = scores.reshape(-1)
    numel = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= numel:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = kth_smallest(flat, k)
    mask = flat < threshold
    need = k - int(torch.count_nonzero(mask))
    if need > 0:
        ties = torch.nonzero(flat == threshold, as_tuple=False).squeeze(1)[:need]
        mask[ties] = True
    return mask.view_as(scores)


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}
ZERO_CHUNK = 1 << 18  # elements per chunk of the integer keep-mask (about 1 MiB, cache resident)


def zero_masked_(tensor: torch.Tensor, mask: torch.Tensor, count: bool = True) -> int | None:
    """``tensor.masked_fill_(mask, 0)`` bit for bit, without its per-element branch; returns the tensor's zeros after it
    (counted as ``count_nonzero`` counts them: -0.0 is a zero), read while each chunk is still in cache, or None
    with ``count=False``.

    ``masked_fill_`` with a random half-dense mask mispredicts a branch per element (2-15 ns each on this CPU);
    AND-ing the float's bits with 0 (pruned) or all ones (kept) writes the same +0.0 and leaves every kept value
    untouched, vectorised. Rows are processed in chunks so that the integer keep-mask stays small. Other dtypes and
    tensors whose last dimension is not contiguous use ``masked_fill_`` itself."""
    int_dtype = _SAME_WIDTH_INT.get(tensor.dtype)
    if int_dtype is None or tensor.dim() != 2 or mask.shape != tensor.shape or tensor.stride(-1) != 1:
        tensor.masked_fill_(mask, 0)
        return tensor.numel() - int(torch.count_nonzero(tensor)) if count else None
    bits = tensor.view(int_dtype)
    step = max(1, ZERO_CHUNK // max(1, tensor.shape[1]))
    nonzero = 0
    for r in range(0, tensor.shape[0], step):
        keep = mask[r:r + step].logical_not().to(int_dtype).neg_()  # False -> 0, True -> -1 (all bits set)
        bits[r:r + step].bitwise_and_(keep)
        if count:
            nonzero += int(torch.count_nonzero(tensor[r:r + step]))
    return tensor.numel() - nonzero if count else None


def smallest_k_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune mask with exactly ``k`` True entries in every row (the ``k`` smallest scores of the row).

    The rows' ``k``-th smallest values come from one NumPy introselect (on the CPU; about twice as fast as a
    half-width ``topk`` and its scatter); a row whose ``scores <= its k-th value`` are exactly ``k`` has only one
    such set, so it is ``topk``'s. The rows with ties at their k-th value take ``topk``'s own choice, so the mask
    is the ``topk`` mask in every row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= scores.shape[1]:
        return torch.ones_like(mask)
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64) and not scores.requires_grad:
        kth = torch.from_numpy(np.partition(scores.numpy(), k - 1, axis=1)[:, k - 1:k])
        mask = scores <= kth
        tied = torch.nonzero(torch.count_nonzero(mask, dim=1) != k).squeeze(1)
        if tied.numel():
            mask[tied] = smallest_k_per_row_topk(scores[tied], k)
        return mask
    return smallest_k_per_row_topk(scores, k)


def smallest_k_per_row_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``smallest_k_per_row`` by a per-row ``topk`` (its tie choices are the mask's)."""
    idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune mask keeping the ``n`` largest scores of every ``m`` consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the input width to be a multiple of {m}; got {cols}.")
    grouped = scores.reshape(rows, cols // m, m)
    idx = torch.topk(grouped, m - n, dim=2, largest=False, sorted=False).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def mask_from_scores(scores: torch.Tensor, sparsity: float, pattern: Pattern, *, scope: str = "row") -> torch.Tensor:
    """Prune mask from importance scores (higher = keep).

    ``scope`` is where an unstructured budget is met exactly: ``"row"`` (each output row loses the same
    number of weights, Wanda's rule) or ``"matrix"`` (one threshold for the whole weight).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}.")
    if pattern.is_nm:
        return nm_prune_mask(scores, pattern.n, pattern.m)
    if scope == "row":
        return smallest_k_per_row(scores, prune_count(scores.shape[1], sparsity))
    if scope == "matrix":
        return smallest_k_mask(scores, prune_count(scores.numel(), sparsity))
    raise ValueError(f"scope={scope!r} is not supported; choose 'row' or 'matrix'.")


MASK_CHUNK = 1 << 22  # scores per chunk of rows (16 MiB of float32) when a mask is made a chunk of rows at a time


def mask_by_rows(score_rows: Callable[[slice], torch.Tensor], shape: tuple[int, int], sparsity: float,
                 pattern: Pattern, *, scope: str = "row", chunk: int | None = None) -> torch.Tensor:
    """``mask_from_scores`` of the scores ``score_rows(slice(None))``, made and ranked a chunk of rows at a time.

    ``score_rows(rows)``: the scores of those rows of the weight. A per-row budget (``scope="row"``) and N:M groups
    are decided within each row, so the chunked mask is the unchunked one exactly, while the working set is one
    chunk's scores and top-k indices instead of the whole matrix's (indices are int64: twice a float32 weight at
    50%). A per-matrix threshold needs every score at once and gets them in one piece."""
    rows, cols = shape
    if not pattern.is_nm and scope == "matrix":
        return mask_from_scores(score_rows(slice(None)), sparsity, pattern, scope=scope)
    step = max(1, (MASK_CHUNK if chunk is None else chunk) // max(1, cols))
    if step >= rows:
        return mask_from_scores(score_rows(slice(None)), sparsity, pattern, scope=scope)
    mask = None
    for r in range(0, rows, step):
        part = mask_from_scores(score_rows(slice(r, r + step)), sparsity, pattern, scope=scope)
        if mask is None:
            mask = torch.empty((rows, cols), dtype=torch.bool, device=part.device)
        mask[r:r + step] = part
    return mask


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of M-groups (along the input dimension) holding more than N non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return rows * math.ceil(cols / m)
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(dim=2)
    return int((nonzero > n).sum())


def sparsity_of(tensor: torch.Tensor) -> float:
    return float((tensor == 0).sum()) / max(1, tensor.numel())


# --------------------------------------------------------------------------------------------
# channel permutation for N:M (RIA's channel reallocation)


def nm_kept_score(scores: torch.Tensor, n: int, m: int) -> float:
    """Total score an N:M mask keeps: the sum, over rows and groups of ``m`` consecutive columns, of the
    ``n`` largest scores of the group."""
    rows, cols = scores.shape
    grouped = scores.to(torch.float64).reshape(rows, cols // m, m)
    return float(torch.topk(grouped, n, dim=2, sorted=False).values.sum())


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """``col[i]`` for every row ``i`` of a square cost matrix, minimising ``sum_i cost[i, col[i]]``.

    Shortest augmenting paths with row/column potentials (the Hungarian method, O(n^3)); the inner scan over
    columns is vectorised, so a few hundred rows take well under a second."""
    size = cost.shape[0]
    u = np.zeros(size + 1)
    v = np.zeros(size + 1)
    row_of = np.zeros(size + 1, dtype=np.int64)  # row_of[j]: 1-based row matched to column j (0: none)
    way = np.zeros(size + 1, dtype=np.int64)
    for i in range(1, size + 1):
        row_of[0] = i
        j0 = 0
        minv = np.full(size + 1, np.inf)
        used = np.zeros(size + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            free = ~used
            free[0] = False
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free[1:] & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free[1:], minv[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    col = np.empty(size, dtype=np.int64)
    col[row_of[1:] - 1] = np.arange(size)
    return col


def _dealt(importance: torch.Tensor, m: int) -> torch.Tensor:
    """Channels sorted by importance and dealt to the groups in snake order (rank r goes to group r mod K,
    the direction reversing every K ranks), so every group holds one channel of each importance band."""
    groups = importance.numel() // m
    order = torch.argsort(importance, descending=True, stable=True)
    slots = torch.empty_like(order)
    for band in range(m):
        targets = torch.arange(groups, device=order.device)
        if band % 2:
            targets = targets.flip(0)
        slots[band * groups:(band + 1) * groups] = targets * m + band
    perm = torch.empty_like(order)
    perm[slots] = order
    return perm


def _reassigned(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int, slot: int, window: int) -> torch.Tensor:
    """One linear-sum-assignment step: the channel at position ``slot`` of every group is taken out and the
    channels are put back, one per group, where they add the most kept score (windows of ``window`` groups)."""
    rows, cols = scores.shape
    groups = cols // m
    perm = perm.clone()
    for start in range(0, groups, window):
        stop = min(groups, start + window)
        ids = torch.arange(start, stop, device=perm.device)
        movers = perm[ids * m + slot]
        rest = torch.stack([perm[ids * m + k] for k in range(m) if k != slot], dim=1)  # [g, m-1]
        others = scores[:, rest].sort(dim=2, descending=True).values  # [rows, g, m-1]
        # with one channel of score s added, a group keeps its n-1 best plus max(its n-th best, s)
        nth = others[:, :, n - 1]  # [rows, g]
        gain = torch.zeros(len(ids), len(ids), dtype=torch.float64, device=scores.device)
        for r0 in range(0, rows, 256):
            s = scores[r0:r0 + 256, movers]  # [r, movers]
            gain += torch.maximum(s.unsqueeze(2), nth[r0:r0 + 256].unsqueeze(1)).sum(dim=0, dtype=torch.float64)
        col = linear_assignment(-gain.cpu().numpy())  # mover c goes to group col[c]
        perm[ids[torch.as_tensor(col, device=perm.device)] * m + slot] = movers
    return perm


def nm_channel_permutation(scores: torch.Tensor, n: int, m: int, *, rounds: int = 8,
                           window: int = 256) -> torch.Tensor:
    """An order of the input channels (columns) under which an N:M mask keeps at least as much score.

    ``scores`` [out, in] (higher = keep, non-negative). Returns ``perm`` such that ``scores[:, perm]`` is the
    permuted matrix; N:M is then chosen on it. Two steps, after the RIA paper (Zhang et al., 2024):

    1. sort the channels by their total score and deal them out to the groups in snake order, so that each
       group of ``m`` holds a balanced share of important channels;
    2. refine by linear-sum assignment: take the channel at one position out of every group (the position cycles)
       and reassign those channels to the groups by the Hungarian method, maximising the kept score; ``rounds``
       steps at most, stopping after ``m`` steps in a row without a gain; ``window`` bounds the groups one
       assignment sees (its cost grows with ``rows x window^2``).

    Each step is kept only when it raises the kept score, and the dealt order is used only when it beats the
    identity, so ``nm_kept_score(scores[:, perm]) >= nm_kept_score(scores)`` always holds."""
    cols = scores.shape[1]
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the input width to be a multiple of {m}; got {cols}.")
    scores = scores.detach().to(torch.float32)
    best = torch.arange(cols, device=scores.device)
    best_score = nm_kept_score(scores, n, m)
    dealt = _dealt(scores.sum(dim=0, dtype=torch.float64), m)
    dealt_score = nm_kept_score(scores[:, dealt], n, m)
    if dealt_score > best_score:
        best, best_score = dealt, dealt_score
    stale = 0
    for step in range(rounds):
        if stale >= m:
            break
        candidate = _reassigned(scores, best, n, m, step % m, window)
        candidate_score = nm_kept_score(scores[:, candidate], n, m)
        if candidate_score > best_score:
            best, best_score, stale = candidate, candidate_score, 0
        else:
            stale += 1
    return best
