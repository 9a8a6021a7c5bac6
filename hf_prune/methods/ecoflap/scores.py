"""ECoFLaP stage 1: importance scores of weight groups from zeroth- or first-order information.

Zeroth order (forward passes only). For a perturbation *unit* (one weight tensor, or a whole group with
``zo_perturb="block"``) and a batch, draw z ~ N(0, I) over the unit's weights from a private generator and

    real loss:    |L(W + eps z) - L(W - eps z)| / (2 eps)      ~ |<grad_W L, z>|, mean sqrt(2/pi) ||grad_W L||
    label-free:   ||f(W + eps z) - f(W)|| / eps                ~ ||J_W z||   (see ``losses``)

averaged over batches and ``zo_num_noise`` directions. The perturbed weights are computed in float32 from
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
    """Snapshot of a unit's weights; ``set(sign)`` writes W + sign * eps * z, ``restore`` copies back."""

    def __init__(self, params: list[nn.Parameter], seeds: list[int], eps: float, generators: _Generators):
        self.params, self.seeds, self.eps, self.generators = params, seeds, eps, generators
        self.snapshots = [p.detach().clone() for p in params]

    def set(self, sign: float) -> None:
        for p, snap, seed in zip(self.params, self.snapshots, self.seeds):
            z = torch.randn(p.shape, generator=self.generators.seeded(p.device, seed), device=p.device,
                            dtype=torch.float32)
            z.mul_(sign * self.eps).add_(snap)  # float32: snapshot + sign * eps * z
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


def zeroth_order_scores(model: nn.Module, units: list[Unit], batches: list[dict], loss: ScoringLoss, *,
                        eps: float, num_noise: int, seed: int, device: torch.device,
                        progress: bool = True, batch_offset: int = 0,
                        total_batches: int | None = None) -> dict[str, float]:
    """Mean zeroth-order estimate per unit (see the module docstring). Weights are restored exactly,
    also when a forward pass fails half-way.

    ``batches`` may be one process's share of the calibration set: ``batch_offset`` is the global index of its
    first batch (the perturbations are seeded by it) and ``total_batches`` the size of the whole set (the mean's
    divisor), so the shares' results add up to the whole set's."""
    from tqdm.auto import tqdm

    generators = _Generators()
    totals = {u.name: 0.0 for u in units}
    bar = tqdm(total=len(batches) * len(units), desc="ecoflap scores (zeroth order)", unit="unit",
               disable=not progress, leave=False)
    with calibration_mode(model):
        for b, batch in enumerate(batches):
            batch = to_device(batch, device)
            reference = loss.outputs(model, batch) if loss.label_free else None
            for u, unit in enumerate(units):
                for k in range(num_noise):
                    seeds = [derive_seed(seed, unit.name, batch_offset + b, k, j) for j in range(len(unit.params))]
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
                    totals[unit.name] += estimate
                bar.update(1)
    bar.close()
    count = (len(batches) if total_batches is None else total_batches) * num_noise
    return {name: total / count for name, total in totals.items()}


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
