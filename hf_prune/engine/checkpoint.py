"""Resumable runs: the block walker checkpoints after every block, a later run continues from the last one.

A checkpoint folder holds

- ``state.json``: the walker position (stage index, block index of the last *completed* block), the run's
  config, fingerprints of the model (config, tensor names/shapes/dtypes and a strided sample of every tensor's
  values, read before anything is pruned), of the config and of the calibration batches, the method's own state
  (per-module info for the report), extras (ECoFLaP's allocation) and the torch RNG state;
- ``blocks/SS-BBBB.safetensors``: every completed block's tensors as they are after pruning;
- ``inputs-SS-BBBB.safetensors``: the next block's cached inputs (the pruned block's outputs), so a resume does not
  recompute earlier blocks: it restores the saved blocks, re-captures the stage's constant inputs (masks,
  position embeddings: one forward up to the stage's first block) and carries on with the saved hidden states.

- ``lock.json``: the live run that owns the folder (pid, host, start time, command line; see ``RunLock``).

A run of several processes (``engine.distributed``) is checkpointed by its main process alone (the others read
the folder on resume, so it must be on a file system they share) and saves no cached inputs (each rank holds
only its share of them): a resume recomputes them by running the restored blocks, and a checkpoint of either kind
resumes with any number of processes.

Every file is written to a temporary name and renamed; ``state.json`` is renamed last and is the commit point,
so a kill at any moment leaves the previous checkpoint valid (a stray newer block file is simply rewritten).
Resuming therefore ends with weights bit-identical to an uninterrupted run on the same device and dtype.

Nothing is committed before there is progress worth keeping (the first completed block, or an extra such as
ECoFLaP's allocation): a run that fails before that leaves no checkpoint, and the folder too is removed when this
run created it, so the corrected command simply runs.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import glob
import hashlib
import json
import os
import shlex
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..atomic import atomic_file
from ..errors import CheckpointError
from ..registry import method_specs
from . import distributed
from .offload import iter_tensors, write_tensors

STATE = "state.json"
LOCK = "lock.json"
FORMAT = 1
KILL_AFTER_ENV = "HF_PRUNE_CHECKPOINT_KILL_AFTER"  # test hook: signal the process after this many checkpoints
KILL_SIGNAL_ENV = "HF_PRUNE_CHECKPOINT_KILL_SIGNAL"  # test hook: which signal (a name such as SIGINT; default SIGKILL)
_DISCARD = "discard it with restart=True (--restart)"  # the way out of every checkpoint that cannot be resumed
# what this module writes into a checkpoint folder besides the lock: the only files a restart or a finished run
# deletes (with the names atomic_file stages them under), so a user's own files in --checkpoint-dir stay
_OWN_FILES = (STATE, "blocks/??-????.safetensors", "inputs-??-????.safetensors")
_SAMPLE = 256


def _save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(data, tmp)


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as exc:  # a missing or unreadable file: the checkpoint is damaged
        raise CheckpointError(f"cannot read {path} of the checkpoint ({exc}); {_DISCARD}.") from None


# --------------------------------------------------------------------------------------------- fingerprints


def model_fingerprint(model: nn.Module) -> str:
    """Config, tensor names/shapes/dtypes and a strided sample of every tensor (offloaded ones read from their maps)."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        data = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(data, sort_keys=True, default=str).encode())
    for name, tensor in iter_tensors(model):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLE)].to("cpu", torch.float64)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(batches: list[dict] | None) -> str:
    h = hashlib.sha256()
    for batch in batches or []:
        for key in sorted(batch):
            value = batch[key]
            h.update(key.encode())
            if torch.is_tensor(value):
                h.update(f"{tuple(value.shape)}:{value.dtype}".encode())
                h.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def _config_dict(config: Any) -> dict:
    data = config.to_dict()
    data.pop("hf_prune_version", None)
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return out


# --------------------------------------------------------------------------------------------- the lock


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux ``/proc``), which tells its owner from a later process
    that reuses the pid; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None  # field 22 of stat; the list starts at field 3


def _alive(owner: dict) -> bool:
    """Whether the run that wrote ``owner`` (a lock's record) still runs. A run on another host cannot be checked
    and counts as alive; an unreadable record counts as dead."""
    if owner.get("host") not in (None, socket.gethostname()):
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name != "posix":  # os.kill(pid, 0) would signal the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    start = owner.get("process_start")
    return start is None or _process_start(pid) in (None, start)


def _describe_owner(owner: dict) -> str:
    """``pid 123 on host, started 2024-05-01T10:00:00+02:00, command: hf-prune prune ...`` for a message."""
    where = f" on {owner['host']}" if owner.get("host") not in (None, socket.gethostname()) else ""
    return (f"pid {owner.get('pid', '?')}{where}, started {owner.get('started', '?')}, command: "
            f"{owner.get('command', '?')}")


def _read_json(path: str) -> dict:
    """The JSON object in ``path``; ``{}`` when it is missing, unreadable or not an object (a file whose writer
    died while writing it)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class _Hold:
    """This process's hold on one folder's lock."""

    record: dict
    count: int = 1
    remove_if_empty: bool = False


class RunLock:
    """A live run's claim on a checkpoint folder: ``lock.json`` with its pid, host, start time and command line,
    created with ``O_EXCL`` so that two runs never both hold it.

    ``acquire`` refuses a folder whose lock belongs to a live run (``CheckpointError`` naming it) and takes over
    a lock that a dead run left. The lock is re-entrant within one process (``hf-prune prune`` holds it from before
    the model loads until the output is saved, and ``Pruner.prune`` takes it again); the last ``release`` removes
    the file and, when this run created the folder (or ``remove_folder_if_empty`` was called) and left nothing
    else in it, the folder too."""

    _held: ClassVar[dict[str, _Hold]] = {}

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK)

    @property
    def record(self) -> dict:
        """The holder's pid, host, start time and command line (this process; empty when not held)."""
        hold = self._held.get(self.folder)
        return dict(hold.record) if hold else {}

    def acquire(self) -> None:
        hold = self._held.get(self.folder)
        if hold is not None:
            hold.count += 1
            return
        created = not os.path.isdir(self.folder)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create the checkpoint folder {self.folder!r}: {exc.strerror}; choose "
                                  "another --checkpoint-dir or --output.") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": shlex.join(sys.argv)}
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                owner = _read_json(self.path)
                if _alive(owner):
                    raise CheckpointError(
                        f"{self.folder!r} is in use by a run that is still going ({_describe_owner(owner)}); wait for "
                        "it to finish or stop it, or write to another --output / checkpoint_dir.") from None
                if _read_json(self.path) == owner:  # unchanged since it was judged: no other run took it over
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
            except OSError as exc:
                raise CheckpointError(f"cannot write {self.path!r}: {exc.strerror}; choose a checkpoint folder you "
                                      "can write to.") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)
        self._held[self.folder] = _Hold(record, remove_if_empty=created)

    def remove_folder_if_empty(self) -> None:
        """Let the last ``release`` remove the folder when nothing but the lock is left in it."""
        hold = self._held.get(self.folder)
        if hold is not None:
            hold.remove_if_empty = True

    def release(self) -> None:
        hold = self._held.get(self.folder)
        if hold is None:
            return
        hold.count -= 1
        if hold.count:
            return
        del self._held[self.folder]
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        if hold.remove_if_empty:
            for folder in (os.path.join(self.folder, "blocks"), self.folder):
                with contextlib.suppress(OSError):  # not empty: something worth keeping, or not ours
                    os.rmdir(folder)


# --------------------------------------------------------------------------------------------- the checkpoint


class RunCheckpoint:
    """The checkpoint of one pruning run in ``folder``, held under its ``RunLock`` until ``close`` (or the end of
    a ``with`` block), success or failure.

    ``resume=False`` starts a new run and refuses a folder that already holds an unfinished one (so nothing is
    overwritten by accident); ``resume=True`` continues the one there and refuses an empty folder; ``restart=True``
    deletes the checkpoint there (only the files a checkpoint writes) and starts a new run. A folder that a live
    run holds is refused in every case. All of this happens at construction, before any weight is touched;
    fingerprints are compared in ``begin``."""

    def __init__(self, folder: str | os.PathLike, *, resume: bool = False, restart: bool = False):
        self.folder = os.path.abspath(os.fspath(folder))
        self.resume = bool(resume)
        self.begun = False
        self.state: dict[str, Any] = {}
        self.saves = 0
        if resume and restart:
            raise CheckpointError("resume (--resume) continues the checkpoint and restart (--restart) deletes it; "
                                  "they contradict each other: drop one.")
        # several processes (engine.distributed): the main one locks, restarts and writes; the others only read
        self.writer = distributed.is_main()
        self.lock = None
        distributed.on_main(lambda: self._claim(restart))
        if not self.writer:
            self._open()

    def _claim(self, restart: bool) -> None:
        """Lock the folder, delete it with ``restart``, read the checkpoint to resume (the writing process)."""
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise CheckpointError(f"the checkpoint path {self.folder!r} is a file; choose a folder.")
        self.lock = RunLock(self.folder)
        self.lock.acquire()
        try:
            if restart:
                self.discard()
            self._open()
        except BaseException:
            self.lock.release()
            self.lock = None
            raise

    def _open(self) -> None:
        """Read the checkpoint to resume, or check that a new run overwrites none."""
        path = os.path.join(self.folder, STATE)
        exists = os.path.isfile(path)
        if self.resume and not exists:
            raise CheckpointError(f"there is no checkpoint to resume in {self.folder!r} (no {STATE}); run without "
                                  "resume (--resume) to start a new run.")
        if not self.resume and exists:  # its writer is not running: a live one would hold the lock
            owner = _read_json(path).get("owner")
            whose = f"a run that is no longer running ({_describe_owner(owner)})" if isinstance(owner, dict) else \
                "a run"
            raise CheckpointError(f"{self.folder!r} already holds the checkpoint of {whose}; resume it with "
                                  f"resume=True (--resume) or {_DISCARD}.")
        if exists:
            try:
                with open(path, encoding="utf-8") as fh:
                    self.state = json.load(fh)
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"cannot read {path} ({exc}); {_DISCARD}.") from None
            if self.state.get("format") != FORMAT:
                raise CheckpointError(f"{path} has checkpoint format {self.state.get('format')!r}; this hf_prune "
                                      f"reads format {FORMAT}; {_DISCARD}.")

    # -- holding the folder
    def close(self) -> None:
        """Release the lock (idempotent): the checkpoint stays for a later resume, unless nothing was committed in
        a folder this run created, which then disappears."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "RunCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def discard(self) -> None:
        """Delete this checkpoint: the files a checkpoint writes and nothing else (a user's own files in the
        folder stay); the folder itself goes at ``close`` if nothing else is left in it."""
        if not self.writer:
            self.state = {}
            return
        for own in _OWN_FILES:  # state.json first: from here on the folder holds no checkpoint
            folder, name = os.path.split(os.path.join(glob.escape(self.folder), own))
            for pattern in (name, f".{name}.partial-*"):  # the file, and what a killed atomic_file left of it
                for path in glob.glob(os.path.join(folder, pattern)):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
        self.state = {}
        if self.lock is not None:
            self.lock.remove_folder_if_empty()

    def progress(self) -> tuple[int, int | None] | None:
        """(completed blocks, blocks in the run) as committed on disk, or None when nothing was committed: what an
        interrupted run can say about where a resume will continue."""
        state = _read_json(os.path.join(self.folder, STATE))
        return (len(state.get("blocks") or []), state.get("total_blocks")) if state else None

    # -- start / compare
    def begin(self, model: nn.Module, config: Any, batches: list[dict] | None, stages: list) -> None:
        """Fingerprint the (still unpruned) model, the config and the data; on resume compare them with the
        checkpoint's and refuse a mismatch, before any weight changes. Idempotent (ECoFLaP calls it for stage 1)."""
        if self.begun:
            return
        prints = {"config": hashlib.sha256(json.dumps(_config_dict(config), sort_keys=True).encode()).hexdigest(),
                  "data": data_fingerprint(batches), "model": model_fingerprint(model)}
        stage_names = [s.name for s in stages]
        if self.resume:
            old = self.state.get("fingerprints", {})
            if old.get("config") != prints["config"]:
                diff = _differences(self.state.get("config", {}), _config_dict(config))
                raise CheckpointError(f"the checkpoint in {self.folder!r} belongs to a run with another config ("
                                      f"{'; '.join(diff[:3]) or 'the configs differ'}); resume with the same config "
                                      f"or {_DISCARD}. Nothing was changed.")
            if old.get("model") != prints["model"]:
                raise CheckpointError(f"the checkpoint in {self.folder!r} belongs to another model (its weights, "
                                      "shapes or config differ); resume with the same unpruned model, freshly loaded, "
                                      f"or {_DISCARD}. Nothing was changed.")
            if old.get("data") != prints["data"]:
                raise CheckpointError(f"the checkpoint in {self.folder!r} was made with other calibration data; "
                                      f"resume with the same dataset, samples, seq_len and seed, or {_DISCARD}. "
                                      "Nothing was changed.")
            if self.state.get("stages") != stage_names:
                raise CheckpointError(f"the checkpoint walked stages {self.state.get('stages')}, this run walks "
                                      f"{stage_names}; {_DISCARD}.")
            rng = self.state.get("rng")
            if rng:
                torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng)), dtype=torch.uint8))
        else:  # committed with the first progress (block_done, save_extra): a failure before leaves no checkpoint
            self.state = {"format": FORMAT, "fingerprints": prints, "config": _config_dict(config),
                          "method": config.method, "stages": stage_names,
                          "total_blocks": sum(len(s.blocks(model)) for s in stages), "position": None,
                          "blocks": [], "inputs": None, "processor": None, "extras": {}, "complete": False}
        self.begun = True

    # -- reading
    @property
    def position(self) -> tuple[int, int] | None:
        pos = self.state.get("position")
        return (pos["stage"], pos["block"]) if pos else None

    @property
    def processor_state(self) -> Any:
        return self.state.get("processor")

    def extra(self, name: str) -> Any:
        return self.state.get("extras", {}).get(name)

    def hidden(self) -> list[torch.Tensor]:
        tensors = _load_tensors(os.path.join(self.folder, self.state["inputs"]))
        return [tensors[f"hidden.{i}"] for i in range(len(tensors))]

    def restore(self, model: nn.Module, stages: list) -> None:
        """Write every completed block's saved tensors into the model (into the weights maps when offloaded)."""
        for entry in self.state.get("blocks", []):
            block = stages[entry["stage"]].blocks(model)[entry["block"]]
            write_tensors(block, _load_tensors(os.path.join(self.folder, entry["file"])))

    # -- writing
    def save_extra(self, name: str, value: Any) -> None:
        self.state.setdefault("extras", {})[name] = value
        self._commit()

    def block_done(self, stage_index: int, block_index: int, block_name: str, block: nn.Module,
                   hidden: list[torch.Tensor] | None, processor_state: Any) -> None:
        """Checkpoint after a block: its tensors, the next block's inputs, the position, then commit."""
        if not self.writer:  # the main process writes the checkpoint of a run of several
            return
        file = os.path.join("blocks", f"{stage_index:02d}-{block_index:04d}.safetensors")
        os.makedirs(os.path.join(self.folder, "blocks"), exist_ok=True)
        _save_tensors(os.path.join(self.folder, file), block.state_dict())
        previous_inputs = self.state.get("inputs")
        inputs = None
        if hidden is not None:
            inputs = f"inputs-{stage_index:02d}-{block_index:04d}.safetensors"
            _save_tensors(os.path.join(self.folder, inputs), {f"hidden.{i}": h for i, h in enumerate(hidden)})
        blocks = [b for b in self.state["blocks"] if (b["stage"], b["block"]) != (stage_index, block_index)]
        blocks.append({"stage": stage_index, "block": block_index, "name": block_name, "file": file})
        self.state.update(position={"stage": stage_index, "block": block_index, "name": block_name},
                          blocks=blocks, inputs=inputs, processor=processor_state,
                          rng=base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode())
        self._commit()
        if previous_inputs and previous_inputs != inputs:
            try:
                os.remove(os.path.join(self.folder, previous_inputs))
            except FileNotFoundError:
                pass
        self.saves += 1
        kill_after = os.environ.get(KILL_AFTER_ENV)
        if kill_after and self.saves >= int(kill_after):  # deterministic crash / Ctrl-C for the resume tests
            os.kill(os.getpid(), getattr(signal, os.environ.get(KILL_SIGNAL_ENV, "SIGKILL")))

    def finish(self) -> None:
        self.state["complete"] = True
        self._commit()

    def _commit(self) -> None:
        if not self.writer:
            return
        if self.lock is not None:  # who wrote it, for the message a later run gives once this one is gone
            self.state["owner"] = self.lock.record
        with atomic_file(os.path.join(self.folder, STATE)) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.state, fh, indent=1, sort_keys=True, default=str)


def resumable_methods() -> list[str]:
    """The registered methods that checkpoint and resume (their spec says ``resumable``)."""
    return sorted(spec.name for spec in method_specs() if spec.resumable)
