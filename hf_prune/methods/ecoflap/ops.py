"""ECoFLaP's allocation as pure math: group scores and sizes -> how many weights each group keeps.

With target sparsity p, ceiling p_max (no group sparser than that), group scores S_g and sizes N_g, the
released code hands out the budget K = (1 - p) * sum N_g as a floor of (1 - p_max) * N_g per group plus
the rest in proportion to the scores, capping saturated groups at density 1 and handing their excess to
the others. Solved exactly, that is a water-filling problem:

    keep_g(lam) = min(N_g, L_g + lam * S_g),    L_g = ceil((1 - p_max) * N_g),    sum_g keep_g(lam) = K

whose solution, when no group saturates, is the closed form of the research notes:

    d_g = keep_g / N_g = (1 - p_max) + (p_max - p) * (S_g / sum S) / (N_g / sum N).

The continuous solution is then rounded to integers (largest remainders) so that the total equals K
exactly and every group is within one weight of its continuous share. The released loop can overshoot K
(a ``+=`` that should be ``-=`` in its over-budget fix-up); this solver cannot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ...patterns import prune_count


@dataclass(frozen=True)
class BudgetSolution:
    """Integer keep counts of one budget, with what the solver saw."""

    keep: list[int]
    budget: int  # K: weights to keep in total
    floor: list[int]  # L_g: the fewest each group may keep (its max_sparsity)
    continuous: list[float]  # the water-filling solution before rounding
    saturated: list[bool]  # kept every weight (density capped at 1)
    level: float  # lam, the weights handed out per unit of score above the floor (inf if none left)


def _check(scores: Sequence[float], sizes: Sequence[int], sparsity: float, max_sparsity: float) -> None:
    if len(scores) != len(sizes) or not scores:
        raise ValueError(f"allocation needs one score per group and at least one group; got {len(scores)} scores "
                         f"for {len(sizes)} groups.")
    for i, (s, n) in enumerate(zip(scores, sizes)):
        if not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ValueError(f"group {i} has score {s!r}; importance scores must be finite and >= 0 "
                             "(a NaN/inf score means the scoring loss overflowed).")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"group {i} has size {n!r}; every group must hold at least one weight.")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1).")
    if not sparsity <= max_sparsity < 1.0:
        raise ValueError(f"max_sparsity={max_sparsity!r} must be in [sparsity={sparsity!r}, 1).")


def water_fill(capacity: Sequence[int], scores: Sequence[float], amount: float) -> tuple[list[float], float]:
    """Hand out ``amount`` in proportion to ``scores``, no group above its ``capacity``.

    Returns the shares ``min(capacity_g, lam * S_g)`` and the level ``lam``. Groups with zero score get
    nothing unless every scored group is full; then the rest is spread in proportion to the remaining
    capacity (an equal density increase), which is also the answer when every score is zero.
    """
    total_capacity = float(sum(capacity))
    if amount > total_capacity * (1 + 1e-12) + 1e-9:
        raise ValueError(f"cannot hand out {amount} weights: the groups can take only {total_capacity}.")
    amount = min(max(amount, 0.0), total_capacity)
    order = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: capacity[i] / scores[i])
    shares = [0.0] * len(capacity)
    left, score_left = amount, float(sum(scores[i] for i in order))
    level = math.inf
    for pos, i in enumerate(order):
        candidate = left / score_left
        if candidate * scores[i] < capacity[i]:  # no remaining scored group saturates at this level
            level = candidate
            for j in order[pos:]:
                shares[j] = candidate * scores[j]
            return shares, level
        shares[i] = float(capacity[i])
        left -= capacity[i]
        score_left -= scores[i]
    # every scored group is full: spread the rest over the zero-score groups by remaining capacity
    rest = [i for i, s in enumerate(scores) if s <= 0]
    room = float(sum(capacity[i] for i in rest))
    if left > 0 and room > 0:
        for i in rest:
            shares[i] = capacity[i] * (left / room)
    return shares, level


def round_to_budget(values: Sequence[float], low: Sequence[int], high: Sequence[int], total: int) -> list[int]:
    """Integers within one of ``values`` (and within ``[low, high]``) summing to ``total`` exactly.

    ``values`` must already lie in ``[low, high]`` and sum to ``total`` (up to float error): floors first,
    then one more for the largest fractional parts.
    """
    keep = [min(max(math.floor(v + 1e-9), lo), hi) for v, lo, hi in zip(values, low, high)]
    missing = total - sum(keep)
    if missing < 0:
        raise ValueError("round_to_budget: the values exceed the total")  # cannot happen for valid inputs
    order = sorted((i for i in range(len(keep)) if keep[i] < high[i]), key=lambda i: keep[i] - values[i])
    if missing > len(order):
        raise ValueError("round_to_budget: not enough room to reach the total")  # idem
    for i in order[:missing]:
        keep[i] += 1
    return keep


def min_keep(size: int, max_sparsity: float) -> int:
    """The fewest weights out of ``size`` that keep the sparsity at or below ``max_sparsity``."""
    return min(size, math.ceil((1.0 - max_sparsity) * size - 1e-9))


def solve_budget(scores: Sequence[float], sizes: Sequence[int], sparsity: float, max_sparsity: float,
                 floors: Sequence[int] | None = None) -> BudgetSolution:
    """Keep counts for groups sharing one budget (see the module docstring).

    ``floors`` overrides the per-group minimum ``min_keep(N_g, max_sparsity)`` (e.g. the sum of the
    minima of a group's modules, so that no *module* exceeds ``max_sparsity`` either).
    The total kept is ``sum(sizes) - prune_count(sum(sizes), sparsity)`` exactly, unless the floors alone
    exceed it (only possible when ``max_sparsity`` is within a weight per group of ``sparsity``): then
    every group sits at its floor, over the budget by less than one weight per group (module).
    """
    scores = [float(s) for s in scores]
    sizes = list(sizes)
    _check(scores, sizes, sparsity, max_sparsity)
    total = sum(sizes)
    budget = total - prune_count(total, sparsity)
    floor = [min_keep(n, max_sparsity) for n in sizes] if floors is None else list(floors)
    if len(floor) != len(sizes) or any(not 0 <= f <= n for f, n in zip(floor, sizes)):
        raise ValueError(f"floors {floor} must give each group between 0 and its size {sizes}.")
    extra = budget - sum(floor)
    if extra <= 0:
        return BudgetSolution(floor, budget, floor, [float(f) for f in floor], [f == n for f, n in zip(floor, sizes)],
                              0.0)
    capacity = [n - f for n, f in zip(sizes, floor)]
    shares, level = water_fill(capacity, scores, float(extra))
    continuous = [f + s for f, s in zip(floor, shares)]
    keep = round_to_budget(continuous, floor, sizes, budget)
    saturated = [k == n for k, n in zip(keep, sizes)]
    return BudgetSolution(keep, budget, floor, continuous, saturated, level)


def closed_form_density(scores: Sequence[float], sizes: Sequence[int], sparsity: float,
                        max_sparsity: float) -> list[float]:
    """The research notes' closed form d_g = (1 - p_max) + (p_max - p) r_g, r_g = (S_g/sum S)/(N_g/sum N).

    Exact for the continuous problem when no group saturates (every d_g <= 1); reference for tests.
    """
    total_s, total_n = float(sum(scores)), float(sum(sizes))
    return [(1.0 - max_sparsity) + (max_sparsity - sparsity) * (s / total_s) / (n / total_n)
            for s, n in zip(scores, sizes)]


def split_keep(keep: int, sizes: Sequence[int], floors: Sequence[int]) -> list[int]:
    """Split a group's keep count over its modules: each its floor, plus the rest in proportion to the
    room above it (the same density increase for every module), rounded to sum to ``keep`` exactly."""
    room = [n - f for n, f in zip(sizes, floors)]
    extra, total_room = keep - sum(floors), sum(room)
    if extra < 0 or extra > total_room:
        raise ValueError(f"cannot keep {keep} weights in modules of sizes {list(sizes)} with floors {list(floors)}.")
    values = [f + (extra * r / total_room if total_room else 0.0) for f, r in zip(floors, room)]
    return round_to_budget(values, list(floors), list(sizes), keep)
