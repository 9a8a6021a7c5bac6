"""Linear-like layers: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2, GPT, ...), which computes the same
``x @ W + b`` with its weight stored transposed, ``[in, out]``. Everything that prunes or measures a layer asks here
for its widths and for its weight as the ``[out, in]`` matrix a Linear holds, so N:M groups always run along the
input dimension."""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (``pytorch_utils.Conv1D``): ``weight`` is ``[nx, nf]`` = ``[in, out]``."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def is_linear_like(module: nn.Module) -> bool:
    """A layer the layer-wise pruners prune: ``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def in_features(module: nn.Module) -> int:
    return int(module.nx) if is_conv1d(module) else int(module.in_features)


def out_features(module: nn.Module) -> int:
    return int(module.nf) if is_conv1d(module) else int(module.out_features)


def as_matrix(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's weight (or ``weight``, a tensor of the layer's stored layout) as an ``[out, in]`` matrix: the
    tensor itself for a Linear, its transposed *view* for a ``Conv1D``, so writing into it writes the weight."""
    weight = module.weight if weight is None else weight
    return weight.t() if is_conv1d(module) else weight
