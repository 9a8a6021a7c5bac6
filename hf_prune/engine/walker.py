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
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import CalibrationDataError, DeviceError, HFPruneError, NonFiniteStatisticsError, UnsupportedModelError
from ..models import Stage
from . import distributed
from .experts import ExpertSlice, ExpertStatsCollector
from .offload import hook_execution_device, is_dispatched, onloaded
from .stats import LinearStats, StatsCollector, distinct


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
    """Cached inputs of the current block, one entry per calibration batch (all on CPU).

    ``args``/``kwargs`` are what the stage's first block receives besides its hidden states; ``own`` holds, per
    batch, the (args, kwargs) of every later block whose extra inputs differ from the first block's (Gemma's and
    ModernBERT's per-layer-type masks and rotary tables, T5's position bias handed on by its first block)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)
    own: list[dict[int, tuple[tuple, dict]]] = field(default_factory=list)

    def extra(self, i: int, index: int = 0) -> tuple[tuple, dict]:
        """(args, kwargs) of block ``index`` of the stage for batch ``i``."""
        own = self.own[i].get(index) if i < len(self.own) else None
        return own if own is not None else (self.args[i], self.kwargs[i])


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
    return distributed.default_cuda_device() if torch.cuda.is_available() else torch.device("cpu")


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


def _split_inputs(stage: Stage, index: int, args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, other positional args, keyword args) of a block call; caches dropped, use_cache off."""
    args = list(args)
    if args:
        hidden = args.pop(0)
    elif "hidden_states" in kwargs:
        kwargs = dict(kwargs)
        hidden = kwargs.pop("hidden_states")
    else:
        raise RuntimeError(f"cannot find the hidden states among the inputs of {stage.path}.{index}")
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return hidden, tuple(args), kwargs


def _same(a: Any, b: Any) -> bool:
    """Whether two block inputs hold the same values (the same object, or equal tensors / containers / scalars)."""
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects without a usable equality: treat as different (per-block inputs are kept)
        return False


def _differs(first: tuple[tuple, dict], other: tuple[tuple, dict]) -> list[str]:
    """Names of the extra inputs in which ``other`` (a later block's) differs from ``first`` (the first block's)."""
    (args0, kwargs0), (args, kwargs) = first, other
    names = [f"positional argument {j + 1}" for j in range(max(len(args0), len(args)))
             if j >= len(args0) or j >= len(args) or not _same(args0[j], args[j])]
    names += [k for k in sorted(set(kwargs0) | set(kwargs)) if k not in kwargs0 or k not in kwargs
              or not _same(kwargs0[k], kwargs[k])]
    return names


REPLAY_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2}  # relative to the output's largest value; else 1e-4


def _replay_context(block: nn.Module, device: torch.device):
    """Run ``block`` on ``device`` for a replay: accelerate's own hooks place a dispatched block (nothing written
    back), a plain one is moved there and back."""
    return contextlib.nullcontext() if is_dispatched(block) else placed(block, device)


def verify_replay(stage: Stage, blocks: nn.ModuleList, captured: StageInputs, real: dict[int, torch.Tensor],
                  device: torch.device) -> None:
    """The check behind block-by-block calibration: block 0 run on the inputs captured from the first batch's
    real forward gives that forward's output of block 0, and block 1 run on that and its own captured inputs gives
    the real output of block 1. A block that reads anything else (state its model sets around the forward, an
    input recomputed between blocks) would be calibrated on wrong activations: it is refused."""
    hidden = captured.hidden[0]
    for index in sorted(real):
        block = blocks[index]
        with _replay_context(block, device):
            out = _run_block(block, captured, 0, device, index=index, hidden=hidden).detach().cpu()
        want = real[index]
        origin = f" ({stage.origin})" if stage.origin else ""
        where = (f"the {stage.name} stage at {stage.path}{origin}, {len(blocks)} blocks of "
                 f"{type(blocks[0]).__name__}")
        if out.shape != want.shape:
            raise UnsupportedModelError(
                f"{where}: replaying {stage.path}.{index} on the inputs captured from the real forward gives an "
                f"output of shape {tuple(out.shape)}, the real forward {tuple(want.shape)}; hf_prune cannot "
                "calibrate these blocks one at a time. Nothing was changed. Register a family for this model "
                "(hf_prune.models.register_family) whose stages say how to drive its blocks.")
        # an overflow of the real forward (NaN/inf) is the statistics check's to report: compare the finite values,
        # and require the replay to overflow in the same places
        finite = torch.isfinite(want.float())
        same_places = bool(torch.equal(finite, torch.isfinite(out.float())))
        scale = float(want.float()[finite].abs().max()) if bool(finite.any()) else 0.0
        diff = float((out.float() - want.float())[finite].abs().max()) if bool(finite.any()) else 0.0
        tolerance = REPLAY_TOLERANCE.get(want.dtype, 1e-4) * max(scale, 1.0)
        if not (same_places and diff <= tolerance):
            extra = (" with the first block's output and its own captured inputs" if index else
                     " with the inputs captured from the real forward")
            raise UnsupportedModelError(
                f"{where}: replaying {stage.path}.{index}{extra} does not reproduce the real forward (largest "
                f"difference {diff:.3g}, outputs up to {scale:.3g}). The block reads something besides its "
                "arguments (state its model sets around the forward, an input recomputed between blocks), so "
                "calibrating it block by block would use wrong activations. Nothing was changed. Register a "
                "family for this model (hf_prune.models.register_family) whose stages say how to drive its "
                "blocks.")
        hidden = out


def probe_batch(batch: dict) -> dict | None:
    """The first row of a calibration batch, when that is well defined: every tensor in it is batch-first with the
    same batch size above one, and every other value is a plain scalar or None (a flattened input such as
    Qwen2-VL's image patches is not batch-first: no probe). The capture's whole-stage forward and the replay check
    then run on one row instead of the whole batch."""
    sizes = set()
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                return None
            sizes.add(value.shape[0])
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            return None
    if len(sizes) != 1 or next(iter(sizes)) < 2:
        return None
    return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def capture_stage_inputs(model: nn.Module, stage: Stage, all_stages: list[Stage], batches: list[dict],
                         device: torch.device, *, verify: bool = True) -> StageInputs:
    """The inputs of the stage's first block for every batch (see ``StageInputs``).

    One forward runs through the whole stage first, on the first row of the first batch (``probe_batch``; the
    whole first batch where no row can be taken alone): every block's extra inputs are compared with the first
    block's, and with ``verify`` the first two blocks are replayed against that real forward (``verify_replay``).
    Where all blocks take the same extra inputs every batch then stops at the first block; where some differ (e.g.
    per-layer-type rotary tables) every batch runs the whole stage and keeps every block's own."""
    blocks = stage.blocks(model)
    probe = probe_batch(batches[0]) if batches else None
    first = batches if probe is None else [probe]
    captured, per_block, real = _capture(model, stage, all_stages, first, device, full=True, keep_real=verify)
    if verify and real:
        verify_replay(stage, blocks, captured, real, device)
    if probe is not None:
        captured, _, _ = _capture(model, stage, all_stages, batches, device, full=per_block, keep_real=False)
    return captured


def _capture(model: nn.Module, stage: Stage, all_stages: list[Stage], batches: list[dict], device: torch.device, *,
             full: bool, keep_real: bool) -> tuple[StageInputs, bool, dict[int, torch.Tensor]]:
    """``capture_stage_inputs`` over ``batches``: ``full`` runs the first batch through the whole stage (and every
    batch, if some block's extra inputs differ from the first block's). Returns the inputs, whether the blocks'
    extra inputs differ, and with ``keep_real`` the first batch's real outputs of blocks 0 and 1."""
    blocks = stage.blocks(model)
    first, last = blocks[0], len(blocks) - 1
    captured = StageInputs()
    state: dict[str, Any] = {"full": full, "per_block": False, "raw": {}, "real": {}}

    def grab(module, args, kwargs):
        hidden, args, kwargs = _split_inputs(stage, 0, args, kwargs)
        captured.hidden.append(hidden.detach().cpu())
        captured.args.append(to_device(args, "cpu"))
        captured.kwargs.append(to_device(kwargs, "cpu"))
        captured.own.append({})
        if not state["full"]:
            raise _StopForward
        state["raw"][0] = (args, kwargs)

    def record(index: int):
        def hook(module, args, kwargs):
            if state["full"]:
                state["raw"][index] = _split_inputs(stage, index, args, kwargs)[1:]
        return hook

    def finish(index: int):
        def hook(module, args, output):
            if state["full"] and keep_real and index < 2 and len(captured.hidden) == 1:
                state["real"][index] = first_tensor(output).detach().cpu()
            if state["full"] and index == last:
                raise _StopForward
        return hook

    handles = [first.register_forward_pre_hook(grab, with_kwargs=True)]
    try:
        with _streamed(model, all_stages, device):
            handles += [blocks[k].register_forward_pre_hook(record(k), with_kwargs=True) for k in range(1, last + 1)]
            handles += [blocks[k].register_forward_hook(finish(k)) for k in range(last + 1)]
            for number, batch in enumerate(batches):
                missing = [k for k in stage.requires if k not in batch]
                if missing:
                    raise CalibrationDataError(
                        f"the {stage.name} stage ({stage.path}) needs {', '.join(stage.requires)} in every "
                        f"calibration batch, but a batch has only {', '.join(sorted(batch))}.")
                state["raw"] = {}
                reached = len(captured.hidden)
                try:
                    stage.run(model, to_device(batch, device))
                except _StopForward:
                    pass
                if len(captured.hidden) == reached or (state["full"] and len(state["raw"]) < last + 1):
                    raise RuntimeError(f"the forward pass never reached {stage.path}.{len(state['raw'])}; cannot "
                                       "calibrate it.")
                if state["full"]:
                    raw = state["raw"]
                    if number == 0:
                        state["per_block"] = any(_differs(raw[0], raw[k]) for k in range(1, last + 1))
                    if state["per_block"]:
                        captured.own[-1] = {k: to_device(raw[k], "cpu") for k in range(1, last + 1)
                                            if _differs(raw[0], raw[k])}
                    state["full"] = state["per_block"]
                    state["raw"] = {}
                mask = batch.get(stage.mask_key) if stage.mask_key else None
                captured.masks.append(None if mask is None else mask.detach().cpu().bool())
    finally:
        for handle in handles:
            handle.remove()
    for hidden in captured.hidden:
        if not bool(torch.isfinite(hidden.float()).all()):  # the weights are finite (checked up front): an overflow
            fix = "load it in float32 or bfloat16" if hidden.dtype == torch.float16 else "check the inputs"
            raise NonFiniteStatisticsError(
                f"NaN/inf in the inputs of {stage.path}.0 before it was pruned; the model's forward pass "
                f"overflows in {hidden.dtype} on these inputs ({fix}).")
    return captured, state["per_block"], state["real"]


def _run_block(block: nn.Module, inputs: StageInputs, i: int, device: torch.device, index: int = 0,
               hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Block ``index`` of the stage on batch ``i`` (``hidden``: its hidden states, default the cached ones)."""
    hidden = (inputs.hidden[i] if hidden is None else hidden).to(device)
    args, kwargs = inputs.extra(i, index)
    return first_tensor(block(hidden, *to_device(args, device), **to_device(kwargs, device)))


def _collect(block: nn.Module, index: int, inputs: StageInputs, wanted: dict, processor: BlockProcessor,
             device: torch.device, dtype: torch.dtype) -> dict[str, LinearStats]:
    """The statistics ``wanted`` of one block over every cached batch: Linear inputs by pre-hooks, fused experts'
    inputs by the tokens their router sends them (``engine.experts``; an expert routed fewer than the processor's
    ``min_tokens`` is recalibrated on all tokens, and each slice's ``report_info`` says which it got)."""
    plain = {n: v for n, v in wanted.items() if not isinstance(v[0], ExpertSlice)}
    experts = {n: v for n, v in wanted.items() if isinstance(v[0], ExpertSlice)}
    mode, min_tokens = getattr(processor, "expert_calibration", ("routed", 1))

    def run(*collectors) -> None:
        for i in range(len(inputs.hidden)):
            for collector in collectors:
                collector.token_mask = inputs.masks[i]
            _run_block(block, inputs, i, device, index)

    with StatsCollector(plain, dtype) as linear, ExpertStatsCollector(experts, dtype, mode=mode) as routed:
        run(linear, routed)
    stats = {**linear.stats, **routed.stats}
    counts = distributed.reduce_floats(routed.routed)  # every rank decides on the tokens of all batches
    counts = {n: int(c) for n, c in counts.items()}
    starved = {n for n, count in counts.items() if count < min_tokens} if mode == "routed" else set()
    if starved:
        with ExpertStatsCollector(experts, dtype, mode="all_tokens", experts=starved) as everything:
            run(everything)
        stats.update(everything.stats)
    for name, (piece, _) in experts.items():
        piece.report_info = {"expert_tokens": counts[name],
                             "calibrated_on": "routed tokens" if mode == "routed" and name not in starved else
                             "all tokens"}
    return stats


def _resume_inputs(done: list[nn.Module], inputs: StageInputs, checkpoint: Any, lo: int, hi: int,
                   device: torch.device) -> None:
    """The inputs of the first block after a resume: this rank's share ``[lo, hi)`` of the hidden states the
    checkpoint saved, or, when it saved none (a run of several processes keeps only weights), the captured stage
    inputs run through the ``done`` blocks, restored as they were pruned: the same tensors either way."""
    saved = checkpoint.hidden() if checkpoint.state.get("inputs") else None
    if saved is not None:
        inputs.hidden = saved[lo:hi] if distributed.active() else saved
        return
    for index, block in enumerate(done):
        with placed(block, device):
            inputs.hidden = [_run_block(block, inputs, i, device, index).detach().cpu()
                             for i in range(len(inputs.hidden))]


def walk(model: nn.Module, stages: list[Stage], batches: list[dict] | None, processor: BlockProcessor, *,
         device: torch.device, progress: bool = True, desc: str = "pruning",
         stats_dtype: torch.dtype = torch.float32, checkpoint: Any = None) -> None:
    """Run ``processor`` over every block of ``stages`` in order (see the module docstring).

    ``checkpoint`` (an ``hf_prune.checkpoint.RunCheckpoint`` that has ``begin``-ed): after every block the block's
    tensors, the next block's inputs, the position and ``processor.state_dict()`` are saved; when it holds a
    position, the completed blocks are restored, ``processor.load_state_dict`` gets its state back and the walk
    continues after that block with the saved inputs (or, when the checkpoint holds none, as a run of several
    processes leaves it, with the inputs recomputed through the restored blocks).

    Under an initialised process group of several ranks (``engine.distributed``) each rank walks its contiguous
    share of ``batches``, the statistics of each block are summed across ranks before ``processor.process``, and
    every rank changes its blocks the same way."""
    from tqdm.auto import tqdm

    lo = hi = 0
    if batches is not None:  # data-parallel: this rank's share of the calibration batches (all of them alone)
        lo, hi = distributed.shard_range(len(batches))
        batches = batches[lo:hi]
    progress = progress and distributed.is_main()

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
                failure = None
                try:
                    inputs = capture_stage_inputs(model, stage, stages, batches, device)
                except (HFPruneError, RuntimeError) as exc:  # every rank learns of it: none waits in a collective
                    failure = exc
                distributed.agree(failure)
                if start > 0:  # the outputs of the last completed block (the constant kwargs are re-captured)
                    _resume_inputs(blocks[:start], inputs, checkpoint, lo, hi, device)
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
                        stats = _collect(block, index, inputs, wanted, processor, device, stats_dtype)
                        distributed.reduce_statistics(stats)  # every rank: the statistics of all batches
                        for name, st in distinct(stats).items():  # a shared accumulator is checked once
                            st.check(name)
                    processor.process(block_name, block, stats)
                    del stats
                    if distributed.check_identical(block):
                        warnings.warn(f"{block_name} came out different on the ranks (a non-deterministic kernel); "
                                      "rank 0's tensors were copied to every rank.", stacklevel=2)
                    last = index + 1 == len(blocks)
                    if inputs is not None and not last:
                        inputs.hidden = [_run_block(block, inputs, i, device, index).detach().cpu()
                                         for i in range(len(inputs.hidden))]
                    if checkpoint is not None:
                        keep = inputs is not None and not last and not distributed.active()  # a share: recomputed
                        checkpoint.block_done(stage_index, index, block_name, block,
                                              inputs.hidden if keep else None,
                                              processor.state_dict())
            bar.close()
            del inputs
