"""Input statistics of Linear layers, accumulated by forward pre-hooks in float32 (or float64).

Kinds:
- ``"sq_norm"``: per input feature, the sum of x_j^2 over real tokens (Wanda's and RIA's ||x_j||).
- ``"gram"``: X^T X over real tokens (SparseGPT's Hessian is 2 X^T X / N; ModHiFi's Gram is X^T X / N).
- ``"sum"``: per input feature, the sum of x_j over real tokens (the mean input, for bias/intercept fits).

Padding tokens never count: the walker sets ``token_mask`` ([B, T] bool) before each batch, and an
input whose leading dims match it is filtered to the real tokens first.

One statistic per distinct input: Linears that read the very same tensor (q/k/v of an attention, gate/up of a
gated MLP, in any family) share one ``LinearStats`` object, so its Gram and norms are accumulated once and
whatever a method derives from it (SparseGPT's inverse-Hessian factor, in ``LinearStats.derived``) is computed
once. Sharing is decided by tensor identity of the hook input (``x is y``, tracked through weak references, so no
activation is kept alive), never by module names: on the first batch a module whose first input is a tensor that
another module with the same statistic kinds already accumulated joins that module's accumulator.

A ``nn.Conv2d`` (``groups=1``) is treated as the Linear it computes on image patches: its input is
unfolded (im2col with the layer's kernel, stride, padding and dilation) into rows of
``in_channels * kh * kw`` features, one row per output position, so the same kinds apply.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NonFiniteStatisticsError
from ..models import in_features

KINDS = ("sq_norm", "gram", "sum")


@dataclass
class LinearStats:
    """Accumulated input statistics of one Linear layer."""

    in_features: int
    kinds: frozenset
    dtype: torch.dtype = torch.float32
    tokens: int = 0
    input_dtype: torch.dtype | None = None  # the activations' own dtype, for a truthful overflow message
    sq_sum: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    x_sum: torch.Tensor | None = None
    _finite: bool = field(default=True, repr=False)
    # quantities a method derives from these statistics (e.g. a factor of the Hessian), computed once for all the
    # Linears sharing this object; a copy (``dataclasses.replace``, ``permuted``) starts empty
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        self.input_dtype = x.dtype
        x = x.to(self.dtype)
        if "sq_norm" in self.kinds:
            part = x.pow(2).sum(dim=0)
            self.sq_sum = part if self.sq_sum is None else self.sq_sum.add_(part)
        if "sum" in self.kinds:
            part = x.sum(dim=0)
            self.x_sum = part if self.x_sum is None else self.x_sum.add_(part)
        if "gram" in self.kinds:
            if self.xtx is None:
                self.xtx = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=x.device)
            self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def release(self) -> None:
        """Drop the accumulated tensors and what was derived from them (after their last reader used them), so a
        block's statistics do not all stay alive until the block is done."""
        self.sq_sum = self.xtx = self.x_sum = None
        self.derived.clear()

    # ---- derived statistics (all float) ------------------------------------------------------
    @property
    def col_sq_mean(self) -> torch.Tensor:
        """Mean over tokens of x_j^2, per input feature ([in])."""
        return self.sq_sum / max(1, self.tokens)

    @property
    def mean(self) -> torch.Tensor:
        """E[x] over tokens ([in])."""
        return self.x_sum / max(1, self.tokens)

    @property
    def gram(self) -> torch.Tensor:
        """E[x x^T] over tokens ([in, in])."""
        return self.xtx / max(1, self.tokens)

    @property
    def hessian(self) -> torch.Tensor:
        """SparseGPT's layer Hessian 2 E[x x^T] ([in, in])."""
        return self.xtx * (2.0 / max(1, self.tokens))

    def permuted(self, perm: torch.Tensor) -> LinearStats:
        """The statistics of the same inputs with their features reordered (``x[:, perm]``): norms and sums
        indexed, the Gram matrix as P^T (X^T X) P."""
        perm = perm.to(device=next((t.device for t in (self.sq_sum, self.xtx, self.x_sum) if t is not None),
                                   perm.device))
        return dataclasses.replace(self, sq_sum=None if self.sq_sum is None else self.sq_sum[perm],
                                   xtx=None if self.xtx is None else self.xtx[perm][:, perm],
                                   x_sum=None if self.x_sum is None else self.x_sum[perm])

    def check(self, name: str) -> None:
        if self.tokens == 0:
            raise NonFiniteStatisticsError(
                f"{name} saw no real (non-padding) token during calibration; check that the calibration "
                "batches carry an attention_mask with ones for real tokens.")
        for label, tensor in (("squared input norms", self.sq_sum), ("input Gram/Hessian", self.xtx),
                              ("input sums", self.x_sum)):
            # one reduction: NaN/inf in any entry makes the sum non-finite; a sum that overflows on finite entries
            # is told apart by the full scan, run only then
            if tensor is not None and not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
                fix = ("Load the model in float32 or bfloat16 (not float16), or check the calibration inputs"
                       if self.input_dtype == torch.float16 else "Check the calibration inputs")
                raise NonFiniteStatisticsError(
                    f"NaN/inf in the {label} of {name}: the activations reaching it ({self.input_dtype}) overflow "
                    f"or are NaN. {fix}.")


def input_width(module: nn.Module) -> int:
    """Features per input row of a Linear, or per unfolded patch of a Conv2d."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"{type(module).__name__} with groups={module.groups}, padding={module.padding!r}, "
                             f"padding_mode={module.padding_mode!r}: only groups=1 with numeric zero padding is "
                             "supported for input statistics.")
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return in_features(module)  # a Linear, or transformers' Conv1D (weight [in, out])


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as rows of features: unchanged for a Linear, im2col patches for a Conv2d."""
    if isinstance(module, nn.Conv2d):
        cols = nn.functional.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                    stride=module.stride)  # [B, C*kh*kw, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x


def distinct(stats: dict[str, LinearStats]) -> dict[str, LinearStats]:
    """One entry per distinct accumulator of ``{name: LinearStats}``, under the name of its first module."""
    out: dict[str, LinearStats] = {}
    ids: set[int] = set()
    for name, st in stats.items():
        if id(st) not in ids:
            ids.add(id(st))
            out[name] = st
    return out


class StatsCollector:
    """Registers pre-hooks on the given Linear (or Conv2d) modules for the duration of a ``with`` block.

    ``stats`` maps every module name to its ``LinearStats``; modules that read the same input tensor map to the
    same object (see the module docstring). Setting ``token_mask`` starts a new batch."""

    def __init__(self, modules: dict[str, tuple[nn.Module, frozenset]], dtype: torch.dtype = torch.float32):
        self.modules = modules
        self.dtype = dtype
        self._token_mask: torch.Tensor | None = None
        self.stats: dict[str, LinearStats] = {}
        self._handles: list = []
        self._seen: dict[int, tuple[weakref.ref, LinearStats]] = {}  # id(input) -> (the input, its accumulator)
        self._batches = 0
        self._called: set[str] = set()  # modules whose hook ran during the first batch
        self._followers: set[str] = set()  # modules that joined another module's accumulator
        for name, (module, kinds) in modules.items():
            unknown = set(kinds) - set(KINDS)
            if unknown:
                raise ValueError(f"unknown statistic kinds {sorted(unknown)} for {name}; known: {KINDS}.")
            self.stats[name] = LinearStats(input_width(module), frozenset(kinds), dtype)

    @property
    def token_mask(self) -> torch.Tensor | None:
        return self._token_mask

    @token_mask.setter
    def token_mask(self, mask: torch.Tensor | None) -> None:
        """The next batch's padding mask; the inputs seen so far belong to the previous batch. A mask with no padding
        is dropped: selecting every token is the input's own rows in the same order, without the copy."""
        self._token_mask = None if mask is not None and bool(mask.all()) else mask
        if self._seen or self._called:
            self._batches += 1
        self._seen.clear()

    def distinct(self) -> dict[str, LinearStats]:
        """One entry per distinct accumulator, under the name of its first module."""
        return distinct(self.stats)

    def _accumulator(self, name: str, module: nn.Module, x: torch.Tensor) -> LinearStats | None:
        """The accumulator ``x`` must be added to, or None when it already holds ``x`` (a shared input)."""
        stats = self.stats[name]
        seen = self._seen.get(id(x))
        owner = seen[1] if seen is not None and seen[0]() is x else None
        first_call = self._batches == 0 and name not in self._called
        self._called.add(name)
        if owner is stats:
            return None
        if (owner is not None and first_call and stats.tokens == 0 and owner.kinds == stats.kinds
                and owner.in_features == stats.in_features and not isinstance(module, nn.Conv2d)):
            self.stats[name] = owner  # same tensor, same statistics: share the accumulator from now on
            self._followers.add(name)
            return None
        if name in self._followers:
            # a module that joined another's accumulator reads a tensor the other never read: the sharing decided
            # on the first batch does not hold, and the shared statistics would be wrong
            raise RuntimeError(f"{name} shares its input statistics with another Linear that read the same tensor on "
                               "the first calibration batch, but reads a different tensor now; the block's forward "
                               "routes its inputs differently per call, which the statistics engine does not support.")
        self._seen[id(x)] = (weakref.ref(x), stats)
        return stats

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            stats = self._accumulator(name, module, x)
            if stats is None:
                return
            mask = self._token_mask
            if mask is not None and x.dim() == 4 and x.shape[1] == 1 and (x.shape[0], x.shape[2]) == tuple(mask.shape):
                x = x[:, 0]  # [batch, 1, tokens, features]: DeepSeek's MLA feeds kv_b_proj its latents with a head axis of 1
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device)]
            stats.update(input_rows(module, x.detach()))

        return hook

    def __enter__(self) -> "StatsCollector":
        for name, (module, _) in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._token_mask = None
        self._seen.clear()
