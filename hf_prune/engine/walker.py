"""The one calibration engine: walk a model's blocks one at a time on the execution device.

For each stage (a list of blocks, see ``architectures``):

1. capture the inputs of the stage's first block for every calibration batch, with *all* positional
   and keyword arguments, by a forward pre-hook that stores them and aborts the forward;
2. for each block: move it to the execution device, collect the statistics the processor asks for
   (pre-hooks on its Linear layers, padding excluded), let the processor change the block, then run
   the *changed* block on the cached inputs to produce the next block's inputs;
3. activations are cached on the CPU between blocks; the rest of the model stays where it is.

No copy of the model is made. A processor that needs no data is walked without any forward pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import CalibrationDataError, DeviceError, NonFiniteStatisticsError
from ..models import Stage
from .offload import hook_execution_device, is_dispatched, onloaded
from .stats import LinearStats, StatsCollector


class BlockProcessor(Protocol):
    """What a method gives the engine."""

    def statistics(self, block_name: str, block: nn.Module) -> dict[str, tuple[nn.Module, frozenset]]:
        """Linear modules of this block whose inputs to record: ``{full_name: (module, kinds)}``."""

    def process(self, block_name: str, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        """Change the block (prune, slice, ...) given the statistics of its inputs."""


class _StopForward(Exception):
    pass


def to_device(obj: Any, device: torch.device | str) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _is_cache(obj: Any) -> bool:
    return type(obj).__name__.endswith("Cache") and hasattr(obj, "get_seq_length")


def first_tensor(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    if hasattr(output, "to_tuple"):
        return first_tensor(output.to_tuple())
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output).__name__}.")


@dataclass
class StageInputs:
    """Cached inputs of the current block, one entry per calibration batch (all on CPU)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _present(device: torch.device) -> bool:
    """Whether this machine has ``device``: its backend (``torch.cuda``, ``torch.xpu``, ...) is available and the
    index, if any, below its device count. A backend torch offers no such check for is taken as present."""
    if device.type in ("cpu", "meta"):
        return True
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None:
        return True
    if not available():
        return False
    count = getattr(backend, "device_count", None)
    return device.index is None or count is None or device.index < count()


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Explicit device > the model's own accelerator > CUDA if present > CPU. A bad name, or a device this
    machine does not have, is a ``DeviceError`` (a ``ValueError``)."""
    if device is not None:
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise DeviceError(f"device={device!r} is not a valid torch device ({exc}).") from None
        if not _present(resolved):
            raise DeviceError(f"device={device!r} is not present on this machine (torch {torch.__version__} finds "
                              f"no {resolved.type} device{'' if resolved.index is None else f' {resolved.index}'});"
                              " use device='cpu' (--device cpu), or leave it unset to use cuda when present, else "
                              "cpu.")
        return resolved
    own = model_device(model)
    if own.type == "meta":  # accelerate offload: the hooks' execution device
        own = hook_execution_device(model) or own
    if own.type not in ("cpu", "meta"):
        return own
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def placed(block: nn.Module, device: torch.device):
    """The block on ``device`` for its calibration passes and processing, back home afterwards.

    An accelerate-offloaded block is materialised from its weights map and its changed tensors written back
    (``offload.onloaded``); a plain block is moved with ``.to``."""
    if is_dispatched(block):
        with onloaded(block, device):
            yield block
        return
    home = model_device(block)
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


@contextlib.contextmanager
def calibration_mode(model: nn.Module):
    """eval(), no KV cache, no autograd; everything restored afterwards."""
    was_training = model.training
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "use_cache", None) and all(c is not config for c, _ in configs):
            configs.append((config, config.use_cache))
    try:
        model.eval()
        for config, _ in configs:
            config.use_cache = False
        with torch.no_grad():
            yield
    finally:
        for config, value in configs:
            config.use_cache = value
        model.train(was_training)


@contextlib.contextmanager
def _streamed(model: nn.Module, stages: list[Stage], device: torch.device):
    """During a capture forward on an accelerator: non-block weights on the device, blocks streamed.

    A model dispatched by accelerate (``device_map``, offload) is left to its own hooks."""
    if is_dispatched(model) or all(t.device == device for t in list(model.parameters()) + list(model.buffers())):
        yield
        return
    block_prefixes = tuple(f"{stage.path}." for stage in stages)
    moved: list[tuple[torch.Tensor, torch.device]] = []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(block_prefixes) and tensor.device != device:
            moved.append((tensor, tensor.device))
            tensor.data = tensor.data.to(device)
    def onload(module: nn.Module, args: tuple) -> None:  # hooks must return None: a value would replace args
        module.to(device)

    handles = []
    for stage in stages:
        for block in stage.blocks(model):
            home = model_device(block)

            def offload(module: nn.Module, args: tuple, output: Any, home: torch.device = home) -> None:
                module.to(home)

            handles.append(block.register_forward_pre_hook(onload))
            handles.append(block.register_forward_hook(offload))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for tensor, home in moved:
            tensor.data = tensor.data.to(home)


def capture_stage_inputs(model: nn.Module, stage: Stage, all_stages: list[Stage], batches: list[dict],
                         device: torch.device) -> StageInputs:
    first = stage.blocks(model)[0]
    captured = StageInputs()

    def grab(module, args, kwargs):
        args = list(args)
        if args:
            hidden = args.pop(0)
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden = kwargs.pop("hidden_states")
        else:
            raise RuntimeError(f"cannot find the hidden states among the inputs of {stage.path}.0")
        kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.hidden.append(hidden.detach().cpu())
        captured.args.append(to_device(tuple(args), "cpu"))
        captured.kwargs.append(to_device(kwargs, "cpu"))
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with _streamed(model, all_stages, device):
            for batch in batches:
                missing = [k for k in stage.requires if k not in batch]
                if missing:
                    raise CalibrationDataError(
                        f"the {stage.name} stage ({stage.path}) needs {', '.join(stage.requires)} in every "
                        f"calibration batch, but a batch has only {', '.join(sorted(batch))}.")
                try:
                    stage.run(model, to_device(batch, device))
                except _StopForward:
                    pass
                else:
                    raise RuntimeError(f"the forward pass never reached {stage.path}.0; cannot calibrate it.")
                mask = batch.get(stage.mask_key) if stage.mask_key else None
                captured.masks.append(None if mask is None else mask.detach().cpu().bool())
    finally:
        handle.remove()
    for hidden in captured.hidden:
        if not bool(torch.isfinite(hidden.float()).all()):  # the weights are finite (checked up front): an overflow
            fix = "load it in float32 or bfloat16" if hidden.dtype == torch.float16 else "check the inputs"
            raise NonFiniteStatisticsError(
                f"NaN/inf in the inputs of {stage.path}.0 before it was pruned; the model's forward pass "
                f"overflows in {hidden.dtype} on these inputs ({fix}).")
    return captured


def _run_block(block: nn.Module, inputs: StageInputs, i: int, device: torch.device) -> torch.Tensor:
    hidden = inputs.hidden[i].to(device)
    args = to_device(inputs.args[i], device)
    kwargs = to_device(inputs.kwargs[i], device)
    return first_tensor(block(hidden, *args, **kwargs))


def walk(model: nn.Module, stages: list[Stage], batches: list[dict] | None, processor: BlockProcessor, *,
         device: torch.device, progress: bool = True, desc: str = "pruning",
         stats_dtype: torch.dtype = torch.float32, checkpoint: Any = None) -> None:
    """Run ``processor`` over every block of ``stages`` in order (see the module docstring).

    ``checkpoint`` (an ``hf_prune.checkpoint.RunCheckpoint`` that has ``begin``-ed): after every block the block's
    tensors, the next block's inputs, the position and ``processor.state_dict()`` are saved; when it holds a
    position, the completed blocks are restored, ``processor.load_state_dict`` gets its state back and the walk
    continues after that block with the saved inputs."""
    from tqdm.auto import tqdm

    resume_at = checkpoint.position if checkpoint is not None else None
    if checkpoint is not None and not (hasattr(processor, "state_dict") and hasattr(processor, "load_state_dict")):
        raise TypeError(f"{type(processor).__name__} cannot be checkpointed (it has no state_dict/load_state_dict).")
    with calibration_mode(model):
        if resume_at is not None:
            checkpoint.restore(model, stages)
            processor.load_state_dict(checkpoint.processor_state)
        for stage_index, stage in enumerate(stages):
            blocks = stage.blocks(model)
            names = stage.block_names(model)
            start = 0
            if resume_at is not None and stage_index <= resume_at[0]:
                start = resume_at[1] + 1 if stage_index == resume_at[0] else len(blocks)
            if start >= len(blocks):
                continue  # finished before the resume
            inputs = None
            if batches is not None:
                inputs = capture_stage_inputs(model, stage, stages, batches, device)
                if start > 0:  # the saved outputs of the last completed block (the constant kwargs are re-captured)
                    inputs.hidden = checkpoint.hidden()
            bar = tqdm(range(start, len(blocks)), desc=f"{desc} [{stage.name}]", unit="block",
                       disable=not progress, leave=False, initial=start, total=len(blocks))
            for index in bar:
                block, block_name = blocks[index], names[index]
                with placed(block, device):
                    wanted = processor.statistics(block_name, block)
                    stats: dict[str, LinearStats] = {}
                    if wanted:
                        if inputs is None:
                            raise CalibrationDataError(f"{block_name} needs calibration data, but none was given.")
                        with StatsCollector(wanted, stats_dtype) as collector:
                            for i in range(len(inputs.hidden)):
                                collector.token_mask = inputs.masks[i]
                                _run_block(block, inputs, i, device)
                        stats = collector.stats
                        for name, st in collector.distinct().items():  # a shared accumulator is checked once
                            st.check(name)
                    processor.process(block_name, block, stats)
                    del stats
                    last = index + 1 == len(blocks)
                    if inputs is not None and not last:
                        inputs.hidden = [_run_block(block, inputs, i, device).detach().cpu()
                                         for i in range(len(inputs.hidden))]
                    if checkpoint is not None:
                        checkpoint.block_done(stage_index, index, block_name, block,
                                              None if inputs is None or last else inputs.hidden,
                                              processor.state_dict())
            bar.close()
            del inputs
