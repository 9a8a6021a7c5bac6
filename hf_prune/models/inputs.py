"""Where images enter a vision tower (input-space methods such as input compensation)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedModelError
from .discovery import get_family


@dataclass(frozen=True)
class PixelInput:
    """Where ``pixel_values`` enter a model's vision tower.

    ``embedding``: the patch-embedding convolution that first reads the pixels; ``consumer``: the deepest
    module (the embedding itself or one of its ancestors) whose ``forward`` takes ``pixel_values``, so a
    pre-hook there changes the pixels for every caller (``forward``, ``get_image_features``, pipelines);
    ``shape``: the ``(channels, height, width)`` the tower is configured for.
    """

    embedding: str
    consumer: str
    shape: tuple[int, int, int]


def _takes_pixel_values(module: nn.Module) -> bool:
    import inspect

    try:
        return "pixel_values" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def pixel_input(model: nn.Module) -> PixelInput:
    """The pixel entry point of a supported vision model (ViT, CLIP, BLIP-2 vision towers)."""
    stages = [s for s in get_family(model).stages(model) if "pixel_values" in s.requires]
    if not stages:
        raise UnsupportedModelError(f"{type(model).__name__} has no vision tower reading pixel_values.")
    config = stages[0].config(model)
    channels = int(getattr(config, "num_channels", 3))
    size = getattr(config, "image_size", None)
    if size is None:
        raise UnsupportedModelError(f"{type(model).__name__}'s vision config has no image_size.")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == channels:
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                path = ".".join(parts[:cut])
                if _takes_pixel_values(model.get_submodule(path)):
                    return PixelInput(name, path, (channels, int(height), int(width)))
            break
    raise UnsupportedModelError(f"no patch-embedding convolution reading pixel_values found in {type(model).__name__}.")
