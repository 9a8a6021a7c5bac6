"""ResNet: convolutional stages with BatchNorm (no transformer MLP; their Conv2d layers are the components, e.g.
for unlearning)."""

from __future__ import annotations

from torch import nn

from .spec import Family, Stage, first_existing, register_family


def _stages(model: nn.Module) -> list[Stage]:
    path = first_existing(model, ("resnet.encoder.stages", "encoder.stages"))
    return [Stage("encoder", path, requires=("pixel_values",), mask_key=None)] if path else []


FAMILY = register_family(Family("resnet", ("resnet",), resolve=_stages, normalization="batch"))
