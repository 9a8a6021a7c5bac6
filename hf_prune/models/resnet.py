"""ResNet: convolutional stages with BatchNorm (no transformer MLP; their Conv2d layers are the components, e.g.
for unlearning)."""

from __future__ import annotations

from torch import nn

from .spec import Family, Stage, first_existing, patch_tokens, register_family


def _stages(model: nn.Module) -> list[Stage]:
    path = first_existing(model, ("resnet.encoder.stages", "encoder.stages"))
    # tokens: as the planner counted any image stage before (it cannot plan a ResNet: no hidden_size)
    return [Stage("encoder", path, requires=("pixel_values",), mask_key=None, tokens=patch_tokens)] if path else []


FAMILY = register_family(Family("resnet", ("resnet",), resolve=_stages, normalization="batch"))
