"""ECoFLaP's allocation arithmetic on random scores: exact budget, the max_sparsity floor, the cap at
density 1 with redistribution, the closed form, and the rounding against brute force."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from hf_prune.methods.ecoflap.ops import (
    closed_form_density,
    min_keep,
    round_to_budget,
    solve_budget,
    split_keep,
    water_fill,
)
from hf_prune.patterns import prune_count


def _reference_continuous(scores, sizes, sparsity, max_sparsity):
    """The released loop's idea, fixed and continuous: from the floors, repeatedly hand out what is left
    in proportion to the scores of the groups that still have room, capping each at its size."""
    total = sum(sizes)
    budget = total - prune_count(total, sparsity)
    keep = [float(min_keep(n, max_sparsity)) for n in sizes]
    left = budget - sum(keep)
    for _ in range(len(sizes) + 1):
        active = [i for i in range(len(sizes)) if keep[i] < sizes[i] and scores[i] > 0]
        if left <= 1e-9 or not active:
            break
        mass = sum(scores[i] for i in active)
        handed = 0.0
        for i in active:
            new = min(float(sizes[i]), keep[i] + left * scores[i] / mass)
            handed += new - keep[i]
            keep[i] = new
        left -= handed
    return keep


def _random_problem(rng, groups):
    sizes = [rng.randint(50, 5000) for _ in range(groups)]
    scores = [rng.lognormvariate(0.0, 1.0) for _ in range(groups)]
    sparsity = rng.uniform(0.2, 0.8)
    max_sparsity = min(0.99, sparsity + rng.uniform(0.02, 0.3))
    return scores, sizes, sparsity, max_sparsity


@pytest.mark.parametrize("seed", range(40))
def test_budget_floor_cap_and_reference_on_random_scores(seed):
    rng = random.Random(seed)
    scores, sizes, p, p_max = _random_problem(rng, rng.randint(2, 24))
    if seed % 4 == 0:  # a small group with a dominant score: it saturates at density 1
        sizes[0] = 50
        scores[0] *= 1e4
    sol = solve_budget(scores, sizes, p, p_max)
    total = sum(sizes)
    assert sum(sol.keep) == sol.budget == total - prune_count(total, p)  # exact budget
    for k, n, x in zip(sol.keep, sizes, sol.continuous):
        assert min_keep(n, p_max) <= k <= n  # never sparser than max_sparsity, never denser than 1
        assert 1.0 - k / n <= p_max + 1e-12
        assert abs(k - x) < 1.0  # within one weight of the continuous share
    reference = _reference_continuous(scores, sizes, p, p_max)
    for x, r, n in zip(sol.continuous, reference, sizes):
        assert x == pytest.approx(r, abs=1e-6 * n)
    if seed % 4 == 0:
        assert sol.saturated[0] and sol.keep[0] == sizes[0]  # capped at density 1, excess handed on


@pytest.mark.parametrize("seed", range(20))
def test_closed_form_when_nothing_saturates(seed):
    rng = random.Random(100 + seed)
    groups = rng.randint(2, 16)
    sizes = [rng.randint(10_000, 200_000) for _ in range(groups)]
    scores = [rng.uniform(0.5, 1.5) * n for n in sizes]  # r_g near 1: nobody reaches density 1
    p = rng.uniform(0.3, 0.7)
    p_max = p + 0.1
    sol = solve_budget(scores, sizes, p, p_max)
    assert not any(sol.saturated)
    density = closed_form_density(scores, sizes, p, p_max)
    assert all(d < 1 for d in density)
    for k, n, d in zip(sol.keep, sizes, density):
        # the solver's floors are whole weights (ceil) and its total is whole: off by a few weights at most
        assert abs(k - d * n) <= groups + 2, (k, d * n)


def test_the_closed_form_by_hand():
    # two equal-size groups, one twice as important: d = 0.4 + 0.1 * r with r = 2/3*2 = 4/3 and 2/3
    sol = solve_budget([2.0, 1.0], [3000, 3000], 0.5, 0.6)
    assert sol.keep == [1600, 1400]
    assert [1 - k / 3000 for k in sol.keep] == pytest.approx([1 - (0.4 + 0.1 * 4 / 3), 1 - (0.4 + 0.1 * 2 / 3)])


def test_saturation_redistributes_to_the_others_by_score():
    # closed form for group 0: d = 0.1 + 0.4 * (10/12) / (1/3) = 1.1 > 1: capped at 1000 kept, and the
    # 300 weights left after its 900 go to groups 1 and 2 in proportion 2:1 on top of their floors of 100
    sol = solve_budget([10.0, 2.0, 1.0], [1000, 1000, 1000], 0.5, 0.9)
    assert sol.keep == [1000, 300, 200] and sol.saturated == [True, False, False]
    assert closed_form_density([10.0, 2.0, 1.0], [1000] * 3, 0.5, 0.9)[0] > 1


def test_zero_scores_get_only_their_floor_unless_nothing_else_has_room():
    sol = solve_budget([1.0, 0.0], [1000, 1000], 0.5, 0.9)
    assert sol.keep == [900, 100]
    sol = solve_budget([1.0, 0.0], [100, 1000], 0.5, 0.9)  # the scored group fills up: the rest goes to the other
    assert sol.keep[0] == 100 and sum(sol.keep) == 550
    sol = solve_budget([0.0, 0.0, 0.0], [100, 200, 300], 0.5, 0.9)  # no information: uniform
    assert sol.keep == [50, 100, 150]


def test_max_sparsity_equal_to_sparsity_is_uniform():
    sizes = [333, 1000, 77]
    sol = solve_budget([5.0, 1.0, 0.1], sizes, 0.5, 0.5)
    assert [1 - k / n for k, n in zip(sol.keep, sizes)] == pytest.approx([0.5, 0.5, 0.5], abs=1 / 77)
    assert abs(sum(sol.keep) - sol.budget) <= len(sizes)  # floors are whole weights: within one per group


def _brute_force_rounding(values, low, high, total):
    best, best_cost = None, math.inf
    for keep in itertools.product(*(range(lo, hi + 1) for lo, hi in zip(low, high))):
        if sum(keep) != total:
            continue
        cost = sum((k - v) ** 2 for k, v in zip(keep, values))
        if cost < best_cost - 1e-12:
            best, best_cost = list(keep), cost
    return best, best_cost


@pytest.mark.parametrize("seed", range(30))
def test_rounding_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 7) for _ in range(rng.randint(2, 4))]
    scores = [rng.choice([0.0, rng.uniform(0.1, 3.0)]) for _ in sizes]
    p = rng.choice([0.25, 0.4, 0.5, 0.6])
    p_max = min(0.95, p + rng.choice([0.1, 0.3, 0.5]))
    sol = solve_budget(scores, sizes, p, p_max)
    if sum(sol.floor) >= sol.budget:
        return
    best, cost = _brute_force_rounding(sol.continuous, sol.floor, sizes, sol.budget)
    ours = sum((k - v) ** 2 for k, v in zip(sol.keep, sol.continuous))
    assert ours == pytest.approx(cost, abs=1e-9), (sol.keep, best)


def test_water_fill_and_split_keep():
    shares, level = water_fill([10, 10, 10], [1.0, 1.0, 4.0], 15.0)
    assert shares == pytest.approx([2.5, 2.5, 10.0]) and level == pytest.approx(2.5)
    keeps = split_keep(1001, [1000, 500, 7], [100, 50, 1])
    assert sum(keeps) == 1001 and all(lo <= k <= n for k, n, lo in zip(keeps, [1000, 500, 7], [100, 50, 1]))
    # the same density increase for every module: densities within a weight of each other
    assert keeps[0] / 1000 == pytest.approx(keeps[1] / 500, abs=2 / 500)
    assert round_to_budget([1.5, 1.5, 1.0], [0, 0, 0], [3, 3, 3], 4) in ([2, 1, 1], [1, 2, 1])


@pytest.mark.parametrize("args,words", [
    (([1.0, -1.0], [10, 10], 0.5, 0.6), "score -1.0"),
    (([1.0, float("nan")], [10, 10], 0.5, 0.6), "must be finite"),
    (([1.0], [10, 10], 0.5, 0.6), "one score per group"),
    (([1.0, 1.0], [10, 0], 0.5, 0.6), "at least one weight"),
    (([1.0, 1.0], [10, 10], 0.5, 0.4), r"max_sparsity=0.4 must be in \[sparsity=0.5, 1\)"),
    (([1.0, 1.0], [10, 10], 1.0, 1.0), r"sparsity=1.0 must be in \[0, 1\)"),
])
def test_bad_inputs(args, words):
    with pytest.raises(ValueError, match=words):
        solve_budget(*args)
