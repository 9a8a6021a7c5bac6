"""The one save path of a (pruned) model folder: ``save_model_folder``.

``Pruner.save_pretrained`` and ``hf_prune.methods.spp.save_model`` both write through it, so a folder of either
reloads the same way: stock ``from_pretrained`` for models whose shapes a stock config holds, and
``trust_remote_code=True`` through ``hf_prune_layout.py`` for per-layer widths (``hf_prune.structured.layout``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ..atomic import atomic_output_dir, check_output_dir
from ..engine.offload import offloaded_state_dict
from ..structured.layout import needs_variable_layout, save_variable_layout


def model_source(model: nn.Module) -> str | None:
    """Where ``model`` was loaded from (``config._name_or_path``: a local folder or a Hub id), or None: the folder
    a save must never replace."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def check_model_output(model: nn.Module, save_directory: str | os.PathLike, *, overwrite: bool = False) -> str:
    """``check_output_dir`` for a folder that will hold ``model``: also refused when it is (or holds) the folder the
    model was loaded from. Returns the absolute path."""
    return check_output_dir(save_directory, overwrite=overwrite, sources=(model_source(model),))


def save_model_folder(model: nn.Module, save_directory: str | os.PathLike, *, overwrite: bool = False,
                      max_shard_size: str | int | None = None, processing: Iterable[Any] = (),
                      extras: Callable[[str, dict | None], None] | None = None) -> str:
    """Write ``model`` into ``save_directory`` atomically (the folder appears complete or not at all) and return
    the folder's absolute path. The folder follows ``hf_prune.atomic.check_output_dir``'s rules: a folder holding
    a previous hf_prune output is replaced only with ``overwrite=True``; any other non-empty folder, and the
    folder the model was loaded from, are refused before anything is written.

    In the staged folder, in this order: the weights (safetensors, sharded at ``max_shard_size`` when given, else
    at transformers' default; a model offloaded by accelerate directly has its state dict read from the weights
    maps), the per-layer layout when the model's widths vary by layer, every tokenizer/processor of
    ``processing`` (None entries skipped), then ``extras(folder, layout)``: the caller's own files (configs,
    report, pictures, model card), given the layout that was written (None when none was needed).
    """
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with atomic_output_dir(save_directory, overwrite=overwrite, sources=(model_source(model),)) as tmp:
        # offloaded weights: transformers reads them from the weights maps for device_map models; a model
        # offloaded by accelerate directly (cpu_offload) gets its state dict read from the maps here
        model.save_pretrained(tmp, state_dict=offloaded_state_dict(model), **kwargs)
        layout = save_variable_layout(model, tmp) if needs_variable_layout(model) else None
        for component in processing:
            if component is not None:
                component.save_pretrained(tmp)
        if extras is not None:
            extras(tmp, layout)
    return os.path.abspath(os.fspath(save_directory))
