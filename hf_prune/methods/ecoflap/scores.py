"""ECoFLaP stage 1: importance scores of weight groups from zeroth- or first-order information.

Zeroth order (forward passes only). For a perturbation *unit* (one weight tensor, or a whole group with
``zo_perturb="block"``) and a batch, draw z ~ N(0, I) over the unit's weights from a private generator and

    real loss:    |L(W + eps z) - L(W - eps z)| / (2 eps)      ~ |<grad_W L, z>|, mean sqrt(2/pi) ||grad_W L||
    label-free:   ||f(W + eps z) - f(W)|| / eps                ~ ||J_W z||   (see ``losses``)

averaged over batches and ``zo_num_noise`` directions. With ``design=True`` (``zo_perturb="design"``) the m weight
tensors of a block are perturbed together in n passes (n: the smallest power of two above m), pass r at
W_j + s_rj eps z_j with the signs s of a Hadamard matrix (``sign_design``); sum_r s_rj L_r / (n eps) is <grad_j L, z_j>
plus O(eps) cross terms of the other tensors (the unperturbed loss and each tensor's own curvature cancel), so each
tensor keeps its own estimate, from the same z_j, for n passes instead of 2 m.

A perturbation of a block's weights cannot change what the
blocks that ran before it computed: one unperturbed forward per batch records every block's output, and while a
unit of block ``b`` is perturbed the blocks that ran before ``b`` return those recorded outputs (copies) instead of
recomputing them, so the passes start, in effect, at ``b`` (the same numbers, about half the block work on a
decoder; memory: one batch's block outputs). The perturbed weights are computed in float32 from
a snapshot and cast once; afterwards the snapshot is copied back, so every weight is bit-identical to
before (add-then-subtract in bf16/fp16 is not). Losses are reduced to Python floats (float64) before
they are subtracted. No autograd graph is built, no ``.grad`` is touched, the global RNG is not used.

First order: one backward per batch with only the scored weights requiring grad. A hook on each weight
(``register_post_accumulate_grad_hook``) adds ``sum |W| * |grad|`` to its score as soon as that gradient
is complete and frees it, so at most a few gradients exist at once, never one per weight of the model.
The transformer blocks are checkpointed (their inner activations are recomputed during the backward
pass instead of being kept), so the autograd graph holds only each block's input: the price is one more
forward pass per batch. Every ``requires_grad`` flag and any pre-existing ``.grad`` are restored.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...engine.walker import calibration_mode, to_device
from ...errors import NonFiniteStatisticsError
from .losses import ScoringLoss


@dataclass
class Unit:
    """Weights perturbed together by the zeroth-order scorer (one tensor, or one group's tensors)."""

    name: str
    group: str
    params: list[nn.Parameter] = field(default_factory=list)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the parts, stable across processes and Python versions."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _Generators:
    """One private ``torch.Generator`` per device; the global RNG is never read or advanced."""

    def __init__(self) -> None:
        self._by_device: dict[str, torch.Generator] = {}

    def seeded(self, device: torch.device, seed: int) -> torch.Generator:
        key = str(device)
        if key not in self._by_device:
            self._by_device[key] = torch.Generator(device=device)
        return self._by_device[key].manual_seed(seed)


class _Perturbation:
    """Snapshot of a unit's weights; ``set(sign)`` writes W + sign * eps * z, ``restore`` copies back.
    ``set(signs)`` with one sign per tensor writes W_j + sign_j * eps * z_j (the sign design); the directions are
    then drawn once and kept (float32), as every pass of the design reuses them."""

    def __init__(self, params: list[nn.Parameter], seeds: list[int], eps: float, generators: _Generators,
                 keep_directions: bool = False):
        self.params, self.seeds, self.eps, self.generators = params, seeds, eps, generators
        self.snapshots = [p.detach().clone() for p in params]
        self.directions = [self._direction(p, seed) for p, seed in zip(params, seeds)] if keep_directions else None

    def _direction(self, p: nn.Parameter, seed: int) -> torch.Tensor:
        return torch.randn(p.shape, generator=self.generators.seeded(p.device, seed), device=p.device,
                           dtype=torch.float32)

    def set(self, sign: float | list[float]) -> None:
        signs = sign if isinstance(sign, list) else [sign] * len(self.params)
        for j, (p, snap, seed, s) in enumerate(zip(self.params, self.snapshots, self.seeds, signs)):
            if self.directions is not None:
                z = torch.mul(self.directions[j], s * self.eps).add_(snap)
            else:
                z = self._direction(p, seed).mul_(s * self.eps).add_(snap)  # float32: snapshot + sign * eps * z
            p.copy_(z)  # one cast to the weight's dtype
            del z

    def restore(self) -> None:
        for p, snap in zip(self.params, self.snapshots):
            p.copy_(snap)


def _check_finite(value: float, what: str) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        raise NonFiniteStatisticsError(
            f"the scoring loss is NaN/inf ({what}); the model overflows on the calibration data. Load it in "
            "float32 or bfloat16, or lower ECoFLaPConfig.zo_eps.")
    return value


def _copy(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_copy(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    return obj


class _BlockPrefix:
    """The recorded outputs of one unperturbed forward, and the blocks that replay them (see the module docstring).

    ``record()`` runs around the unperturbed forward of a batch: every block's output and its call position are kept
    (a block called more than once disables the replay for that batch). ``replay(block)`` makes every block that
    ran before ``block`` return a copy of its recorded output; ``replay(None)`` recomputes everything."""

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks
        self.outputs: dict[int, Any] = {}
        self.position: dict[int, int] = {}
        self.valid = False
        self._replaying: list[tuple[nn.Module, bool, Any]] = []

    @contextlib.contextmanager
    def record(self):
        self.restore()
        self.outputs, self.position, calls = {}, {}, {}

        def hook(module, args, output):
            calls[id(module)] = calls.get(id(module), 0) + 1
            self.position.setdefault(id(module), len(self.position))
            self.outputs[id(module)] = output

        handles = [block.register_forward_hook(hook) for block in self.blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.valid = bool(calls) and all(c == 1 for c in calls.values())

    def replay(self, block: nn.Module | None) -> None:
        self.restore()
        if block is None or not self.valid or id(block) not in self.position:
            return
        before = self.position[id(block)]
        for other in self.blocks:
            if self.position.get(id(other), before) < before:
                had_own = "forward" in other.__dict__
                self._replaying.append((other, had_own, other.__dict__.get("forward")))
                recorded = self.outputs[id(other)]
                other.forward = lambda *args, _out=recorded, **kwargs: _copy(_out)

    def restore(self) -> None:
        for block, had_own, own in self._replaying:
            if had_own:
                block.forward = own
            else:
                del block.forward
        self._replaying = []

    def clear(self) -> None:
        self.restore()
        self.outputs, self.position, self.valid = {}, {}, False


def sign_design(m: int) -> list[list[float]]:
    """The sign design of ``m`` tensors perturbed together: rows of the Sylvester-Hadamard matrix of order n (the
    smallest power of two above ``m``), columns 1..m. Every column sums to zero and any two are orthogonal, so
    with L_r the loss at W_j + s_rj eps z_j (all j at once), sum_r s_rj L_r / (n eps) = <grad_j L, z_j> + O(eps):
    the unperturbed loss and every tensor's own second-order term cancel. m = 1 is the central difference."""
    n = 2
    while n <= m:
        n *= 2
    return [[-1.0 if bin(r & c).count("1") % 2 else 1.0 for c in range(1, m + 1)] for r in range(n)]


def zeroth_order_sums(model: nn.Module, units: list[Unit], batches: list[dict], loss: ScoringLoss, *,
                      eps: float, num_noise: int, seed: int, device: torch.device, progress: bool = True,
                      batch_offset: int = 0, blocks: list[nn.Module] | None = None,
                      design: bool = False) -> dict[str, float]:
    """The sum over ``batches`` and ``num_noise`` directions of each unit's zeroth-order estimate (see
    ``zeroth_order_scores``). ``design``: the units (weight tensors) of one block are perturbed together, with
    the signs of ``sign_design``, and each one's estimate is read off the signed sum of the block's passes (real
    losses only; a label-free loss perturbs one unit at a time)."""
    from tqdm.auto import tqdm

    generators = _Generators()
    totals = {u.name: 0.0 for u in units}
    prefix = _BlockPrefix(blocks or [])
    owner = {id(p): block for block in (blocks or []) for p in block.parameters()}
    unit_block = {unit.name: owner.get(id(unit.params[0])) if unit.params else None for unit in units}
    if any(len({id(owner.get(id(p))) for p in unit.params}) > 1 for unit in units):
        unit_block = {unit.name: None for unit in units}  # a unit spanning blocks: no replay at all
    design = design and not loss.label_free
    if design:
        sets: dict[Any, list[Unit]] = {}
        for unit in units:  # the units of one block together; a unit outside every block alone
            block = unit_block[unit.name]
            sets.setdefault(id(block) if block is not None else ("alone", unit.name), []).append(unit)
        unit_sets = list(sets.values())
    else:
        unit_sets = [[unit] for unit in units]
    bar = tqdm(total=len(batches) * len(units), desc="ecoflap scores (zeroth order)", unit="unit",
               disable=not progress, leave=False)
    with calibration_mode(model):
        try:
            for b, batch in enumerate(batches):
                batch = to_device(batch, device)
                reference = None
                if loss.label_free or blocks:
                    with prefix.record():
                        reference = loss.outputs(model, batch) if loss.label_free else loss.value(model, batch)
                for unit_set in unit_sets:
                    prefix.replay(unit_block[unit_set[0].name])
                    if len(unit_set) == 1 and not design:
                        unit = unit_set[0]
                        totals[unit.name] += _unit_estimate(model, unit, batch, batch_offset + b, loss, reference, eps,
                                                            num_noise, seed, generators)
                    else:
                        for unit, estimate in zip(unit_set, _design_estimates(
                                model, unit_set, batch, batch_offset + b, loss, eps, num_noise, seed, generators)):
                            totals[unit.name] += estimate
                    bar.update(len(unit_set))
                prefix.clear()
        finally:
            prefix.clear()
    bar.close()
    return totals


def zeroth_order_scores(model: nn.Module, units: list[Unit], batches: list[dict], loss: ScoringLoss, *,
                        eps: float, num_noise: int, seed: int, device: torch.device,
                        progress: bool = True, batch_offset: int = 0, total_batches: int | None = None,
                        blocks: list[nn.Module] | None = None, design: bool = False) -> dict[str, float]:
    """Mean zeroth-order estimate per unit (see the module docstring). Weights are restored exactly,
    also when a forward pass fails half-way. ``blocks``: the model's transformer blocks, whose recorded outputs
    are replayed for the blocks that run before a perturbed unit's block (None: every pass runs in full).
    ``design``: see ``zeroth_order_sums``.

    ``batches`` may be one process's share of the calibration set: ``batch_offset`` is the global index of its
    first batch (the perturbations are seeded by it) and ``total_batches`` the size of the whole set (the mean's
    divisor), so the shares' results add up to the whole set's."""
    totals = zeroth_order_sums(model, units, batches, loss, eps=eps, num_noise=num_noise, seed=seed, device=device,
                               progress=progress, batch_offset=batch_offset, blocks=blocks, design=design)
    count = (len(batches) if total_batches is None else total_batches) * num_noise
    return {name: total / count for name, total in totals.items()}


def _unit_estimate(model: nn.Module, unit: Unit, batch: dict, b: int, loss: ScoringLoss, reference: Any, eps: float,
                   num_noise: int, seed: int, generators: _Generators) -> float:
    """The sum over ``num_noise`` directions of one unit's estimate on one batch."""
    total = 0.0
    for k in range(num_noise):
        seeds = [derive_seed(seed, unit.name, b, k, j) for j in range(len(unit.params))]
        perturbation = _Perturbation(unit.params, seeds, eps, generators)
        try:
            if loss.label_free:
                perturbation.set(+1.0)
                diff = loss.outputs(model, batch) - reference
                distance = float(diff.double().pow(2).sum().div(diff.shape[0]).sqrt())
                estimate = _check_finite(distance, unit.name) / eps
            else:
                perturbation.set(+1.0)
                plus = _check_finite(float(loss.value(model, batch)), unit.name)
                perturbation.set(-1.0)
                minus = _check_finite(float(loss.value(model, batch)), unit.name)
                estimate = abs(plus - minus) / (2.0 * eps)
        finally:
            perturbation.restore()
        del perturbation
        total += estimate
    return total


def _design_estimates(model: nn.Module, unit_set: list[Unit], batch: dict, b: int, loss: ScoringLoss, eps: float,
                      num_noise: int, seed: int, generators: _Generators) -> list[float]:
    """The sum over ``num_noise`` directions of each unit's estimate on one batch, the units perturbed together
    with the signs of ``sign_design`` (n passes for m < n units instead of 2 m). Each unit's direction is the one
    ``_unit_estimate`` draws for it; a single unit gets exactly ``_unit_estimate``'s central difference."""
    rows = sign_design(len(unit_set))
    params = [p for unit in unit_set for p in unit.params]
    totals = [0.0] * len(unit_set)
    for k in range(num_noise):
        seeds = [derive_seed(seed, unit.name, b, k, j) for unit in unit_set for j in range(len(unit.params))]
        perturbation = _Perturbation(params, seeds, eps, generators, keep_directions=True)
        values = []
        try:
            for row in rows:
                perturbation.set([s for s, unit in zip(row, unit_set) for _ in unit.params])
                values.append(_check_finite(float(loss.value(model, batch)), unit_set[0].name))
        finally:
            perturbation.restore()
        del perturbation
        for i in range(len(unit_set)):
            totals[i] += abs(sum(row[i] * v for row, v in zip(rows, values))) / (len(rows) * eps)
    return totals


@contextlib.contextmanager
def checkpointed(blocks: list[nn.Module]):
    """Run each block under activation checkpointing (non-reentrant, any args/kwargs/outputs), in eval
    mode too (transformers' own switch only works in training mode); the original forwards come back."""
    saved = []
    try:
        for block in blocks:
            had_own = "forward" in block.__dict__
            saved.append((block, had_own, block.__dict__.get("forward")))
            inner = block.forward

            def forward(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

            block.forward = forward
        yield
    finally:
        for block, had_own, own in saved:
            if had_own:
                block.forward = own
            else:
                del block.forward


def first_order_scores(model: nn.Module, weights: dict[str, nn.Parameter], batches: list[dict], loss: ScoringLoss,
                       *, seed: int, device: torch.device, progress: bool = True,
                       blocks: list[nn.Module] | None = None, batch_offset: int = 0,
                       total_batches: int | None = None) -> dict[str, float]:
    """Mean over batches of ``sum |W| * |dL/dW|`` per weight tensor, one backward per batch; ``blocks`` are
    checkpointed (see the module docstring). ``batch_offset`` / ``total_batches``: as in ``zeroth_order_scores``
    for one process's share of the batches."""
    from tqdm.auto import tqdm

    scores = {name: 0.0 for name in weights}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    scored = {id(p) for p in weights.values()}
    stashed = {name: p.grad for name, p in weights.items()}
    handles = []
    generators = _Generators()

    def hook(name: str):
        def reduce(p: torch.Tensor) -> None:
            grad = p.grad
            part = p.detach().abs().float().mul_(grad.abs().float()).sum(dtype=torch.float64)  # new tensors only
            scores[name] += float(part)
            p.grad = None  # freed at once: no full set of gradients ever exists

        return reduce

    try:
        for p in params:
            if id(p) not in scored:
                p.requires_grad_(False)
        for name, p in weights.items():
            p.grad = None
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(hook(name)))
        with calibration_mode(model), torch.enable_grad(), checkpointed(blocks or []):
            for b, batch in enumerate(tqdm(batches, desc="ecoflap scores (first order)", unit="batch",
                                           disable=not progress, leave=False)):
                batch = to_device(batch, device)
                if loss.label_free:
                    out = loss.outputs(model, batch)
                    u = torch.randn(out.shape, generator=generators.seeded(out.device, derive_seed(seed, "fo", batch_offset + b)),
                                    device=out.device, dtype=out.dtype)
                    value = (u * out).sum() / out.shape[0] ** 0.5
                else:
                    value = loss.value(model, batch)
                _check_finite(float(value.detach()), f"batch {b}")
                value.backward()
                del value
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for name, p in weights.items():
            p.grad = stashed[name]
    for name, value in scores.items():
        _check_finite(value, name)
    return {name: value / (len(batches) if total_batches is None else total_batches) for name, value in scores.items()}
