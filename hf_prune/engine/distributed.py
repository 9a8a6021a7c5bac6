"""Data-parallel calibration across processes with ``torch.distributed``.

A run launched with ``torchrun`` / ``accelerate launch`` (an initialised default process group with more than one
process; ``hf-prune prune`` initialises it from the launcher's environment) calibrates data-parallel:

- **sharding**: the block walker gives each rank one contiguous share of the calibration batches (sizes differ by
  at most one; ``shard_range``); each rank caches and runs only its share through every block;
- **reduction**: when a block's statistics are final, ``reduce_statistics`` all-reduces (sums) every accumulator
  and its token count, so every rank holds the statistics of all the batches, exactly what one process would sum
  up to the order of the additions (the per-rank partial sums are added across ranks, not batch after batch);
- **applying**: every rank then runs the same method math on the same statistics and applies the same masks and
  weight updates, so the model stays identical on every rank without sending any weight (``check_identical``
  verifies that with one all-gather of a per-block checksum and, should a non-deterministic kernel have made the
  ranks differ, copies rank 0's block to the others);
- **writing**: only the main process (rank 0) writes checkpoints, saves and pushes; ``on_main`` runs a step there
  and hands its result, or its error, to every rank, so no rank waits forever on a rank that failed.

Backends: gloo on CPU (tested here with two processes on loopback); nccl on CUDA (each rank computes on
``cuda:LOCAL_RANK``; written the same way, not tested here: there is no multi-GPU machine in CI). Without an
initialised process group, or with one process, every function here is a no-op and the run is single-process.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import CalibrationDataError, HFPruneError

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """Whether this process is one of several in an initialised default process group."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes checkpoints, saves and pushes."""
    return rank() == 0


def backend() -> str | None:
    return str(_dist().get_backend()) if active() else None


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env(device: str | None = None) -> bool:
    """Initialise the default process group from a launcher's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) when this process was launched as one of several and no group exists yet:
    nccl when the run computes on CUDA, else gloo. Returns whether this process now runs distributed."""
    dist = _dist()
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return active()
    if not dist.is_available():
        raise HFPruneError("this process was launched as one of several (WORLD_SIZE > 1), but this torch build has no "
                           "torch.distributed; run a single process, or install a torch with distributed support.")
    wants_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if wants_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    return active()


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def default_cuda_device() -> torch.device:
    """The CUDA device of this rank: ``cuda:LOCAL_RANK`` when distributed, else ``cuda``."""
    return torch.device("cuda", local_rank()) if active() else torch.device("cuda")


# --------------------------------------------------------------------------------------------- sharding


def shard_bounds(count: int, ranks: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` shares of ``count`` items for ``ranks`` ranks, the first ``count % ranks`` one
    larger."""
    base, extra = divmod(count, ranks)
    bounds, lo = [], 0
    for r in range(ranks):
        hi = lo + base + (1 if r < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def shard_range(count: int) -> tuple[int, int]:
    """This rank's ``[lo, hi)`` share of ``count`` calibration batches (all of them in a single process).

    Raises ``CalibrationDataError`` when there are fewer batches than processes."""
    ranks = world_size()
    if ranks > 1 and count < ranks:
        raise CalibrationDataError(
            f"{count} calibration batch{'es' if count != 1 else ''} cannot be split across {ranks} processes: every "
            f"process needs at least one. Use more calibration samples (num_samples >= {ranks} * batch_size), a "
            "smaller batch_size, or fewer processes. Nothing was changed.")
    return shard_bounds(count, ranks)[rank()]


def split_record(count: int) -> dict | None:
    """How ``count`` calibration batches were split, for the report (None in a single process)."""
    if not active():
        return None
    sizes = [hi - lo for lo, hi in shard_bounds(count, world_size())]
    return {"world_size": world_size(), "backend": backend(), "batches": count, "batches_per_rank": sizes,
            "split": "contiguous: rank r takes the r-th run of consecutive batches",
            "statistics": "all-reduced (summed) with their token counts after each block",
            "weights": "every rank applies the same masks and updates; checksums compared after each block"}


def record_split(report: dict, split: dict) -> None:
    """Write a data-parallel run's split into ``report``: in full under ``run.distributed``, and as one line of
    its calibration provenance (``data_parallel``), which the model card's calibration table shows."""
    report["run"]["distributed"] = dict(split)
    calibration = report.get("calibration")
    if isinstance(calibration, dict):
        report["calibration"] = {**calibration, "data_parallel": (
            f"{split['world_size']} processes ({split['backend']}): the {split['batches']} calibration batches split "
            f"into consecutive runs of {' + '.join(map(str, split['batches_per_rank']))}; statistics summed across "
            "processes after each block; every process applied the same masks and updates")}


# --------------------------------------------------------------------------------------------- reduction


def _reduce_(tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
    """All-reduce ``tensor`` in place (sum by default), moving it to where the backend reduces if needed."""
    dist = _dist()
    op = dist.ReduceOp.SUM if op is None else op
    target = tensor.device
    if backend() == "nccl" and tensor.device.type != "cuda":
        target = default_cuda_device()
    elif backend() == "gloo" and tensor.device.type != "cpu":
        target = torch.device("cpu")
    if target == tensor.device:
        dist.all_reduce(tensor, op=op)
        return tensor
    moved = tensor.to(target)
    dist.all_reduce(moved, op=op)
    tensor.copy_(moved)
    return tensor


_ACCUMULATORS = (("sq_norm", "sq_sum", lambda n: (n,)), ("gram", "xtx", lambda n: (n, n)),
                 ("sum", "x_sum", lambda n: (n,)))


def reduce_statistics(stats: dict[str, Any]) -> None:
    """Sum every rank's input statistics of a block (``{name: LinearStats}``) in place, with their token counts,
    so that each rank holds the statistics of all calibration batches. An accumulator shared by several names is
    reduced once. A no-op in a single process; every rank must call it for the same names."""
    if not active():
        return
    unique: dict[int, Any] = {}
    for name in sorted(stats):
        unique.setdefault(id(stats[name]), stats[name])
    entries = list(unique.values())
    if not entries:
        return
    tokens = torch.tensor([st.tokens for st in entries], dtype=torch.int64)
    _reduce_(tokens)
    for st, count in zip(entries, tokens.tolist()):
        st.tokens = int(count)
        for kind, attr, shape in _ACCUMULATORS:
            if kind not in st.kinds:
                continue
            value = getattr(st, attr)
            if value is None:  # this rank saw no real token: it adds zeros
                value = torch.zeros(shape(st.in_features), dtype=st.dtype, device=_where(entries))
                setattr(st, attr, value)
            _reduce_(value)


def _where(entries: list) -> torch.device:
    for st in entries:
        for _, attr, _ in _ACCUMULATORS:
            value = getattr(st, attr)
            if value is not None:
                return value.device
    return torch.device("cpu")


def reduce_floats(values: dict[str, float]) -> dict[str, float]:
    """``{name: sum over ranks}`` of per-rank Python floats (float64), in sorted-name order on every rank."""
    if not active():
        return dict(values)
    names = sorted(values)
    tensor = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
    _reduce_(tensor)
    return dict(zip(names, tensor.tolist()))


# --------------------------------------------------------------------------------------------- private folders


def shared_folders(records: list[tuple[str, list[str]]]) -> list[tuple[str, int, int]]:
    """``(folder, rank, other rank)`` for every folder that two ranks on the same host both write, from each
    rank's ``(host, folders)``."""
    owner: dict[tuple[str, str], int] = {}
    clashes = []
    for r, (host, folders) in enumerate(records):
        for folder in folders:
            first = owner.setdefault((host, folder), r)
            if first != r:
                clashes.append((folder, first, r))
    return clashes


def check_private_folders(folders: list[str], what: str, fix: str, error: type = HFPruneError) -> None:
    """Refuse (``error``, on every rank) when two processes on one host would write the same folder."""
    if not active():
        return
    import socket

    records: list[Any] = [None] * world_size()
    _dist().all_gather_object(records, (socket.gethostname(), sorted({os.path.abspath(f) for f in folders})))
    clashes = shared_folders(records)
    if clashes:
        folder, a, b = clashes[0]
        raise error(f"ranks {a} and {b} both write {what} {folder!r}; {fix}. Nothing was changed.")


# --------------------------------------------------------------------------------------------- identical ranks


def _checksum(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        data = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_identical(module: nn.Module) -> bool:
    """After a block was changed on every rank: compare a checksum of its tensors across ranks and, if any rank
    differs from rank 0 (a non-deterministic kernel), copy rank 0's tensors to every rank. Returns whether a copy
    was needed (False in a single process)."""
    if not active():
        return False
    dist = _dist()
    sums: list[Any] = [None] * world_size()
    dist.all_gather_object(sums, _checksum(module))
    if len(set(sums)) == 1:
        return False
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            moved = tensor.data if backend() != "gloo" or tensor.device.type == "cpu" else tensor.data.cpu()
            if backend() == "nccl" and moved.device.type != "cuda":
                moved = moved.to(default_cuda_device())
            dist.broadcast(moved, src=0)
            if moved is not tensor.data:
                tensor.data.copy_(moved)
    return True


# --------------------------------------------------------------------------------------------- main only


def on_main(step: Callable[[], T]) -> T:
    """Run ``step`` on the main process only and return its result on every rank (it must pickle); an error on
    the main process is raised on every rank (as an ``HFPruneError`` naming it on the others), so none waits on a
    rank that failed. A plain call in a single process."""
    global _main_step
    if not active() or _main_step:  # a step inside a step (push_to_hub saves): already on the main process only
        return step()
    dist = _dist()
    box: list[Any] = [None]
    error: BaseException | None = None
    if is_main():
        _main_step = True
        try:
            box[0] = ("ok", step())
        except BaseException as exc:  # handed to the other ranks, then re-raised here
            error = exc
            box[0] = ("error", _describe(exc))
        finally:
            _main_step = False
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise _error_like(value, "the main process (rank 0) failed")
    return value


_main_step = False


def _describe(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def _error_like(described: tuple[str, str], where: str) -> HFPruneError:
    """The error another rank raised, as the same ``hf_prune.errors`` class when it is one (else ``HFPruneError``),
    its message prefixed with where it happened."""
    from .. import errors

    name, message = described
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, HFPruneError)):
        cls, message = HFPruneError, f"{name}: {message}"
    return cls(f"{where}: {message}")


def agree(error: BaseException | None) -> None:
    """Every rank reports whether a step failed on it; if any did, every rank raises (its own error, or an
    ``HFPruneError`` naming the failing rank's), so that none is left waiting in a collective."""
    if not active():
        if error is not None:
            raise error
        return
    dist = _dist()
    messages: list[Any] = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else _describe(error))
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        raise _error_like(m, f"rank {r} failed")


def barrier() -> None:
    if active():
        _dist().barrier()


# --------------------------------------------------------------------------------------------- training


def fsdp_in_use(args: Any = None, model: nn.Module | None = None) -> bool:
    """Whether a ``Trainer`` run shards its model with FSDP: ``TrainingArguments.fsdp`` set, ``accelerate launch``
    configured for FSDP (``ACCELERATE_USE_FSDP``), or a model already wrapped (FSDP1 modules, FSDP2 classes or
    DTensor parameters)."""
    if args is not None and getattr(args, "fsdp", None):
        return True
    if os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes"):
        return True
    if model is None:
        return False
    for module in model.modules():
        name = type(module).__name__
        if name == "FullyShardedDataParallel" or name.startswith("FSDP"):
            return True
    return any(type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"
               for p in model.parameters())
