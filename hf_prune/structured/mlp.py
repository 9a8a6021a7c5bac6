"""MLP hidden neurons as removable groups: {producer rows (+ bias), consumer columns} per block.

A neuron of LLaMA's MLP is one row of ``gate_proj`` and ``up_proj`` and one column of ``down_proj``;
of OPT/BERT/ViT/CLIP/BLIP-2's, one row (and bias entry) of ``fc1``/``intermediate`` and one column of
``fc2``/``output``. Removing it is exact (the neuron's contribution simply disappears); keeping
the same count in every block of a stage lets the stock config (``intermediate_size``/``ffn_dim``) hold
the new width, so ``from_pretrained`` reloads the smaller model without any code of ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..models import MLPSpec, Stage, get_family


@dataclass
class MLPGroup:
    """The MLP of one block: full module names and its current width."""

    stage: Stage
    block: str
    inputs: tuple[str, ...]
    output: str
    width: int

    @property
    def spec(self) -> MLPSpec:
        return self.stage.mlp


def mlp_groups(model: nn.Module, stages: list[Stage] | None = None) -> list[MLPGroup]:
    """The MLP of every block of every stage that has one, in walk order."""
    stages = get_family(model).stages(model) if stages is None else stages
    groups = []
    for stage in stages:
        if stage.mlp is None:
            continue
        for block_name in stage.block_names(model):
            inputs = tuple(f"{block_name}.{n}" for n in stage.mlp.inputs)
            output = f"{block_name}.{stage.mlp.output}"
            width = model.get_submodule(output).in_features
            for name in inputs:
                if model.get_submodule(name).out_features != width:
                    raise ValueError(f"{name} has {model.get_submodule(name).out_features} outputs but {output} "
                                     f"takes {width} inputs; the MLP layout is not the one hf_prune expects.")
            groups.append(MLPGroup(stage, block_name, inputs, output, width))
    return groups


def _index(keep: torch.Tensor | list[int], size: int, what: str) -> torch.Tensor:
    idx = torch.as_tensor(keep, dtype=torch.long).flatten()
    if idx.numel() == 0:
        raise ValueError(f"cannot keep zero {what}: keep at least one.")
    if int(idx.min()) < 0 or int(idx.max()) >= size:
        raise ValueError(f"{what} indices must lie in [0, {size}).")
    if idx.unique().numel() != idx.numel():
        raise ValueError(f"{what} indices contain duplicates.")
    return idx.sort().values


def keep_rows(linear: nn.Linear, keep: torch.Tensor | list[int]) -> None:
    """Keep only the given output rows (and bias entries) of ``linear``, in place."""
    idx = _index(keep, linear.out_features, "output rows").to(linear.weight.device)
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.index_select(0, idx).clone(),
                                     requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, idx).clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = idx.numel()


def keep_columns(linear: nn.Linear, keep: torch.Tensor | list[int]) -> None:
    """Keep only the given input columns of ``linear``, in place (the bias is untouched)."""
    idx = _index(keep, linear.in_features, "input columns").to(linear.weight.device)
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.index_select(1, idx).clone(),
                                     requires_grad=linear.weight.requires_grad)
    linear.in_features = idx.numel()


def shrink_mlp(model: nn.Module, group: MLPGroup, keep: torch.Tensor | list[int]) -> None:
    """Remove every neuron of ``group`` not in ``keep`` (exact: the kept neurons compute what they did).

    A module holding the MLP that records its width as a plain attribute named like the config field
    (LLaMA's ``LlamaMLP.intermediate_size``) is updated too, so the model describes itself truthfully."""
    idx = _index(keep, group.width, f"{group.block} MLP neuron")
    for name in group.inputs:
        keep_rows(model.get_submodule(name), idx)
    keep_columns(model.get_submodule(group.output), idx)
    owner = os.path.commonprefix([n.split(".") for n in (*group.inputs, group.output)])
    module = model.get_submodule(".".join(owner)) if owner else model
    if getattr(module, group.spec.width_key, None) == group.width:
        setattr(module, group.spec.width_key, idx.numel())
    group.width = idx.numel()


def set_mlp_width(model: nn.Module, stage: Stage) -> int:
    """Write the stage's (uniform) MLP width into its config so stock ``from_pretrained`` rebuilds it.

    Raises ``ValueError`` if the blocks' widths differ: stock configs hold one width per stage.
    """
    widths = {g.width for g in mlp_groups(model, [stage])}
    if len(widths) != 1:
        raise ValueError(f"the {stage.name} stage's blocks have different MLP widths {sorted(widths)}; a stock "
                         f"config stores one {stage.mlp.width_key}, so keep the same number of neurons in every block.")
    width = widths.pop()
    setattr(stage.config(model), stage.mlp.width_key, width)
    return width
