"""Sparsity patterns and mask construction: pure tensor functions, no hooks, no models.

Convention: a *prune mask* is a bool tensor shaped like the weight, ``True`` where the weight is removed.
``N:M`` always means *keep N of every M consecutive weights along the input dimension* (NVIDIA's
meaning); 2:4 and 4:8 therefore remove exactly half of every group.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

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


def smallest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune mask with exactly ``k`` True entries at the ``k`` smallest scores of the whole tensor.

    Uses a k-th value threshold plus explicit tie filling, so it needs no full argsort of a large matrix.
    """
    flat = scores.reshape(-1)
    numel = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= numel:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(k).values
    mask = flat < threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = torch.nonzero(flat == threshold, as_tuple=False).squeeze(1)[:need]
        mask[ties] = True
    return mask.view_as(scores)


def smallest_k_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune mask with exactly ``k`` True entries in every row (the ``k`` smallest scores of the row)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= scores.shape[1]:
        return torch.ones_like(mask)
    idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
    return mask.scatter_(1, idx, True)


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


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of M-groups (along the input dimension) holding more than N non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return rows * math.ceil(cols / m)
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(dim=2)
    return int((nonzero > n).sum())


def sparsity_of(tensor: torch.Tensor) -> float:
    return float((tensor == 0).sum()) / max(1, tensor.numel())
