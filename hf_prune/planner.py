"""Plan a prune before starting it: expected peak memory per stage, disk needed, and time.

The model is built from its config on the ``meta`` device (no weights, no memory), so a LLaMA-2-70B
plans on a laptop. The memory model follows what the engine does (``calibration/walker.py``):

- execution device, per block: the block's weights, the statistics the method accumulates for all of the
  block's targeted Linears at once, one per distinct input tensor (q/k/v share one, so do gate/up; found by a
  ``meta`` forward of the block) (``sq_norm``: in floats; ``gram``: in x in floats, fp32), the forward
  working set of one calibration batch, and the method's per-layer solve (SparseGPT: an fp32 copy of the
  weight and three in x in matrices);
- host: the model's weights unless offloaded (CPU offload keeps them in RAM; disk offload keeps what
  ``max_memory`` lets accelerate hold in RAM plus the one block being pruned), plus the cached activations of
  every calibration sample (inputs and outputs of the current block), plus the Python process itself
  (``RUNTIME_BYTES``); when the execution device is the CPU, the block's working set above (statistics, solve,
  forward) is host memory too;
- disk: the saved model, plus the offloaded weights for disk offload.

Time: FLOPs of the block passes (statistics, then pruned outputs, plus the capture forward) and of the
per-layer solves, divided by a matrix-multiply throughput measured on the execution device (or by timing one
real block when ``measure_block=True``).

An allocator (ECoFLaP) adds its scoring stage first, planned with its config's defaults: whole-model passes
with all weights on the execution device, then its layer-wise pruner as above.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration.config import fit_seq_len
from .engine.report import format_table
from .engine.targets import linear_candidates
from .engine.walker import first_tensor
from .models import get_family, in_features, out_features, text_context
from .registry import MethodCost, default_method, get_method

GIB = 2 ** 30
# resident memory of the process before any model: Python 3.11 with torch 2.13 (CPU), transformers 5.24 and hf_prune
# imported measured 0.37-0.44 GiB on Linux (VmRSS); it is part of every measured peak RSS
RUNTIME_BYTES = int(0.4 * GIB)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_config(model_or_config: str):
    """A transformers config from a folder, a ``config.json`` file or a Hub id (the id needs network)."""
    from transformers import AutoConfig

    if os.path.isfile(model_or_config):
        with open(model_or_config, encoding="utf-8") as fh:
            data = json.load(fh)
        if "model_type" not in data:
            raise ValueError(f"{model_or_config} has no 'model_type'; it is not a transformers config.json.")
        return AutoConfig.for_model(**data)
    return AutoConfig.from_pretrained(model_or_config)


def meta_model(config) -> nn.Module:
    """The model ``config`` describes, on the meta device (its own architecture class when known)."""
    import transformers

    cls = None
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    with torch.device("meta"):
        if cls is not None:
            return cls(config)
        return transformers.AutoModel.from_config(config)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 3) -> float:
    """Sustained matrix-multiply throughput (FLOP/s) of ``device`` in ``dtype``."""
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # CPUs compute half precision through float32 at best
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / max(time.perf_counter() - start, 1e-9)


@dataclass
class StagePlan:
    name: str
    blocks: int
    block_params: int
    hidden: int
    tokens_per_sample: int
    stats_bytes: int
    solve_bytes: int
    forward_bytes: int
    device_peak: int
    activation_cache: int
    flops: float
    solve_flops: float = 0.0  # the part of ``flops`` spent in per-layer solves (every process does them all)


@dataclass
class Plan:
    model: str
    model_class: str
    method: str
    dtype: str
    parameters: int
    weight_bytes: int
    num_samples: int
    seq_len: int
    batch_size: int
    offload: str
    stages: list[StagePlan] = field(default_factory=list)
    device_peak: int = 0
    host_peak: int = 0
    disk: int = 0
    flops: float = 0.0
    throughput: float = 0.0
    seconds: float = 0.0
    throughput_source: str = ""
    # data-parallel calibration (``num_processes`` > 1; with one process these equal the totals above)
    num_processes: int = 1
    batches_per_process: int = 0
    process_device_peak: int = 0
    process_host_peak: int = 0
    node_host_peak: int = 0
    allreduce_bytes: int = 0
    bandwidth: float = 0.0
    single_process_seconds: float = 0.0

    def fits(self, device_memory: float | None) -> bool | None:
        return None if device_memory is None else self.device_peak <= device_memory

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def table(self) -> str:
        rows = [[s.name, s.blocks, human_count(s.block_params), human_bytes(s.stats_bytes), human_bytes(s.solve_bytes),
                 human_bytes(s.forward_bytes), human_bytes(s.device_peak), human_bytes(s.activation_cache)]
                for s in self.stages]
        head = (f"{self.model} ({self.model_class}): {human_count(self.parameters)} parameters, {self.dtype} weights "
                f"{human_bytes(self.weight_bytes)}; method {self.method}; {self.num_samples} samples x {self.seq_len} "
                f"tokens, batch {self.batch_size}; offload {self.offload}")
        body = format_table(rows, ["stage", "blocks", "params/block", "stats", "solve", "forward", "device peak",
                                   "activations"])
        tail = (f"expected peak on the execution device: {human_bytes(self.device_peak)}\n"
                f"expected peak host memory: {human_bytes(self.host_peak)}\n"
                f"disk needed: {human_bytes(self.disk)}\n"
                f"estimated time{' with one process' if self.num_processes > 1 else ''}: "
                f"{human_seconds(self.single_process_seconds)} ({human_count(self.flops)}FLOP at "
                f"{human_count(self.throughput)}FLOP/s, {self.throughput_source})")
        if self.num_processes > 1:
            tail += (f"\nwith {self.num_processes} processes (data-parallel calibration, "
                     f"{self.batches_per_process} of the {-(-self.num_samples // self.batch_size)} batches each; "
                     "every process holds the model, the block and the full statistics):\n"
                     f"  per process: device peak {human_bytes(self.process_device_peak)}, host peak "
                     f"{human_bytes(self.process_host_peak)} (all {self.num_processes} on one machine: "
                     f"{human_bytes(self.node_host_peak)})\n"
                     f"  statistics all-reduced: {human_bytes(self.allreduce_bytes)} per process at an assumed "
                     f"{self.bandwidth / 1e9:.0f} GB/s\n"
                     f"  estimated time: {human_seconds(self.seconds)} (block passes split across processes; solves "
                     "repeated on every process; plus the all-reduce)")
        return "\n".join([head, body, tail])


def human_count(n: float) -> str:
    """1234 -> '1.23 K', 7_000_000_000 -> '7.00 G' (SI prefixes; a plain number below a thousand)."""
    for value, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= value:
            return f"{n / value:.2f} {prefix}"
    return f"{n:.0f} "


def human_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1: '512 B', '3.4 MiB', '13.5 GiB'."""
    for value, unit in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if abs(n) >= value:
            return f"{n / value:.1f} {unit}"
    return f"{n:.0f} B"


def human_seconds(seconds: float) -> str:
    """'0.4 s', '59 s', '4.2 min', '3.1 h'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan(model_or_config: str, method: str | None = None, *, num_samples: int = 128, seq_len: int | None = None,
         batch_size: int = 8, dtype: str | None = None, offload: str = "none", device: str | None = None,
         throughput: float | None = None, measure_block: bool = False, max_memory: float | None = None,
         num_processes: int = 1, bandwidth: float = 10e9) -> Plan:
    """Expected memory, disk and time of ``hf-prune prune`` for a model, without loading any weight.

    ``offload``: ``"none"`` (the model in host RAM), ``"cpu"`` (the same, for accelerate CPU offload) or
    ``"disk"`` (weights on disk, one block in RAM at a time). ``max_memory`` (bytes): the CPU budget given to
    accelerate when loading with disk offload (``hf-prune prune --max-memory``); accelerate keeps up to that much
    of the weights in RAM, so it counts toward the host peak. ``throughput`` (FLOP/s) overrides the measurement.

    ``num_processes``: data-parallel calibration (``torchrun --nproc_per_node N hf-prune prune ...``). Each
    process holds the model and walks its share of the batches: the device peak per process is that of one
    process (the block, the full statistics, one batch), the cached activations shrink to its share, the block
    passes (and an allocator's scoring passes) divide among the processes while every process repeats the
    per-layer solves, and each block's statistics are all-reduced (a ring all-reduce sends 2 (N-1)/N of them per
    process, at ``bandwidth`` bytes/s, an assumption: give your interconnect's).
    """
    if not isinstance(num_processes, int) or isinstance(num_processes, bool) or num_processes < 1:
        raise ValueError(f"num_processes={num_processes!r} must be a whole number >= 1.")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth={bandwidth!r} must be a positive number of bytes per second.")
    batches = -(-num_samples // batch_size)
    if batches < num_processes:
        raise ValueError(f"{num_samples} samples in batches of {batch_size} make {batches} batches, fewer than "
                         f"num_processes={num_processes}: every process needs at least one; use more samples, a "
                         "smaller batch size or fewer processes.")
    if offload not in ("none", "cpu", "disk"):
        raise ValueError(f"offload={offload!r} is not supported; choose 'none', 'cpu' or 'disk'.")
    if max_memory is not None and (offload != "disk" or not max_memory > 0):
        raise ValueError(f"max_memory={max_memory!r} only applies to offload='disk' and must be a positive number of "
                         "bytes (the CPU budget of the weights accelerate keeps in RAM).")
    method = method or default_method()
    spec = get_method(method)
    cost = spec.cost(spec.config_class()) if spec.cost is not None else MethodCost()  # with the config's defaults
    statistics = cost.statistics
    config = load_config(model_or_config)
    model = meta_model(config)
    dtype_name = dtype or str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    dtype_name = dtype_name.replace("torch.", "")
    if dtype_name not in _DTYPES:
        raise ValueError(f"dtype={dtype_name!r} is not supported; choose one of {sorted(_DTYPES)}.")
    torch_dtype = _DTYPES[dtype_name]
    width = torch.tensor([], dtype=torch_dtype).element_size()
    parameters = sum(p.numel() for p in model.parameters())
    # unset: what `prune` uses, the model's context when shorter than 2048 (an explicit one past it is refused)
    seq_len = fit_seq_len(seq_len, text_context(model))
    family = get_family(model)
    stages = family.stages(model)
    result = Plan(model=str(model_or_config), model_class=type(model).__name__, method=method, dtype=dtype_name,
                  parameters=parameters, weight_bytes=parameters * width, num_samples=num_samples, seq_len=seq_len,
                  batch_size=batch_size, offload=offload)
    largest_block = 0
    for stage in stages:
        blocks = stage.blocks(model)
        block = blocks[0]
        block_params = sum(p.numel() for p in block.parameters())
        largest_block = max(largest_block, block_params)
        linears = [m for n, m, *_ in linear_candidates(model, [stage]) if n.startswith(f"{stage.path}.0.")]
        # one statistic per distinct input (the engine shares it between Linears reading the same tensor)
        readers = distinct_inputs(model, stage, linears)
        stats = 0
        if "sq_norm" in statistics:
            stats += sum(in_features(m) for m in readers) * 4
        if "gram" in statistics:
            stats += sum(in_features(m) ** 2 for m in readers) * 4
        solves = [cost.solve(in_features(m), out_features(m)) for m in linears] if cost.solve is not None else []
        solve = max(b for b, _ in solves) if solves else 0
        hidden = stage.config(model).hidden_size  # the residual width: what the walker caches per token
        widest = max(max(out_features(m) for m in linears), max(in_features(m) for m in linears))
        tokens = stage.tokens_per_sample(model, seq_len)
        # one batch through the block: a few tensors of the widest activation, plus attention scores
        forward = batch_size * tokens * widest * width * 4 + batch_size * tokens * tokens * width
        device_peak = block_params * width + stats + solve + forward
        activations = 2 * num_samples * tokens * hidden * width
        passes = 3 if statistics else 0  # capture, statistics, pruned outputs
        flops = passes * 2 * block_params * num_samples * tokens * len(blocks)
        solve_flops = len(blocks) * sum(f for _, f in solves)
        result.stages.append(StagePlan(stage.name, len(blocks), block_params, hidden, tokens, stats, solve, forward,
                                       device_peak, activations, flops + solve_flops, solve_flops))
    if cost.extra_stage is not None:  # a stage that runs before the walk (an allocator's scoring)
        result.stages.insert(0, cost.extra_stage(model, stages, result.stages, width, batch_size, seq_len))
    result.device_peak = max(s.device_peak for s in result.stages)
    exec_device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resident = result.weight_bytes if offload != "disk" else \
        min(result.weight_bytes, max_memory or 0) + largest_block * width
    # on the CPU the block's statistics, solve and forward working set live in host memory as well
    working = max(s.stats_bytes + s.solve_bytes + s.forward_bytes for s in result.stages) \
        if exec_device.type == "cpu" else 0
    result.host_peak = RUNTIME_BYTES + resident + max(s.activation_cache for s in result.stages) + working
    result.disk = result.weight_bytes * (2 if offload == "disk" else 1)
    result.flops = sum(s.flops for s in result.stages)
    if throughput is not None:
        result.throughput, result.throughput_source = throughput, "given"
    elif measure_block:
        result.throughput, result.throughput_source = _measure_block(model, stages[0], exec_device, torch_dtype,
                                                                     batch_size, seq_len), "one real block timed"
    else:
        result.throughput = measure_matmul_flops(exec_device, torch_dtype)
        result.throughput_source = f"matmul measured on {exec_device}"
    result.seconds = result.single_process_seconds = result.flops / result.throughput
    # data-parallel: per process, its share of the batches (the largest share), the whole statistics
    share = -(-batches // num_processes)
    fraction = share / batches
    result.num_processes, result.batches_per_process, result.bandwidth = num_processes, share, bandwidth
    result.process_device_peak = result.device_peak
    result.process_host_peak = RUNTIME_BYTES + resident + max(int(s.activation_cache * fraction) for s in result.stages) \
        + working
    result.node_host_peak = num_processes * result.process_host_peak
    if num_processes > 1:
        reduced = sum(s.blocks * s.stats_bytes for s in result.stages)
        result.allreduce_bytes = int(reduced * 2 * (num_processes - 1) / num_processes)
        passes = sum(s.flops - s.solve_flops for s in result.stages)
        solves = sum(s.solve_flops for s in result.stages)
        result.seconds = (passes * fraction + solves) / result.throughput + result.allreduce_bytes / bandwidth
    return result


def distinct_inputs(model: nn.Module, stage, linears: list[nn.Module]) -> list[nn.Module]:
    """One Linear per distinct input tensor of the stage's first block (q/k/v read one tensor, so do gate/up): found
    by running the block once on ``meta`` tensors (no memory, no compute) and comparing the Linears' inputs by
    identity, as the statistics engine does. A block that cannot run from its hidden states alone (it needs other
    inputs) is counted with one input per Linear, the most memory the statistics can take."""
    import inspect

    block = stage.blocks(model)[0]
    inputs: dict[int, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple) -> None:
        inputs.setdefault(id(module), args[0])  # the tensor itself (free on meta), so identities stay distinct

    handles = [m.register_forward_pre_hook(keep) for m in linears]
    try:
        config = stage.config(model)
        hidden = config.hidden_size
        device = next(block.parameters()).device
        x = torch.empty(1, 8, hidden, device=device)
        kwargs = {}
        if "position_embeddings" in inspect.signature(block.forward).parameters:  # rotary models
            head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
            kwargs["position_embeddings"] = (torch.empty(1, 8, head_dim, device=device),
                                             torch.empty(1, 8, head_dim, device=device))
        if device.type != "meta":
            return linears
        with torch.no_grad():
            block(x, **kwargs)
    except Exception:  # noqa: BLE001 - any failure only means the sharing is unknown
        return linears
    finally:
        for handle in handles:
            handle.remove()
    if len(inputs) != len(linears):
        return linears
    out: list[nn.Module] = []
    for m in linears:
        if not any(inputs[id(m)] is inputs[id(o)] for o in out):
            out.append(m)
    return out


def _measure_block(model: nn.Module, stage, device: torch.device, dtype: torch.dtype, batch_size: int,
                   seq_len: int) -> float:
    """Throughput (FLOP/s) of one real block with random weights on ``device`` (one batch of up to 512 tokens)."""
    import copy
    import inspect

    block = copy.deepcopy(stage.blocks(model)[0]).to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    config = stage.config(model)
    hidden = config.hidden_size
    tokens = min(seq_len, 512)
    x = torch.randn(batch_size, tokens, hidden, device=device, dtype=dtype)
    kwargs = {}
    if "position_embeddings" in inspect.signature(block.forward).parameters:  # rotary models: cost is the same
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        kwargs["position_embeddings"] = (torch.ones(1, tokens, head_dim, device=device, dtype=dtype),
                                         torch.zeros(1, tokens, head_dim, device=device, dtype=dtype))
    params = sum(p.numel() for p in block.parameters())
    with torch.no_grad():
        first_tensor(block(x, **kwargs))  # warm-up
        start = time.perf_counter()
        for _ in range(2):
            first_tensor(block(x, **kwargs))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / 2
    return 2 * params * batch_size * tokens / max(seconds, 1e-9)
