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

Every file is written to a temporary name and renamed; ``state.json`` is renamed last and is the commit point,
so a kill at any moment leaves the previous checkpoint valid (a stray newer block file is simply rewritten).
Resuming therefore ends with weights bit-identical to an uninterrupted run on the same device and dtype.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_file
from ..errors import CheckpointError
from ..registry import method_specs
from .offload import iter_tensors, write_tensors

STATE = "state.json"
FORMAT = 1
KILL_AFTER_ENV = "HF_PRUNE_CHECKPOINT_KILL_AFTER"  # test hook: SIGKILL the process after this many checkpoints
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
        raise CheckpointError(f"cannot read {path} of the checkpoint ({exc}); delete the checkpoint folder and "
                              "start again.") from None


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


# --------------------------------------------------------------------------------------------- the checkpoint


class RunCheckpoint:
    """The checkpoint of one pruning run in ``folder``.

    ``resume=False`` starts a new run and refuses a folder that already holds an unfinished one (so nothing is
    overwritten by accident); ``resume=True`` continues the one there and refuses an empty folder. Both checks
    happen at construction, before any weight is touched; fingerprints are compared in ``begin``."""

    def __init__(self, folder: str | os.PathLike, *, resume: bool = False):
        self.folder = os.path.abspath(os.fspath(folder))
        self.resume = bool(resume)
        self.begun = False
        self.state: dict[str, Any] = {}
        self.saves = 0
        path = os.path.join(self.folder, STATE)
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise CheckpointError(f"the checkpoint path {self.folder!r} is a file; choose a folder.")
        exists = os.path.isfile(path)
        if resume and not exists:
            raise CheckpointError(f"there is no checkpoint to resume in {self.folder!r} (no {STATE}); run without "
                                  "resume (--resume) to start a new run.")
        if not resume and exists:
            raise CheckpointError(f"{self.folder!r} already holds a run's checkpoint; resume it with resume=True "
                                  "(--resume) or delete that folder to start again.")
        if exists:
            try:
                with open(path, encoding="utf-8") as fh:
                    self.state = json.load(fh)
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"cannot read {path} ({exc}); delete the checkpoint folder and start again.") \
                    from None
            if self.state.get("format") != FORMAT:
                raise CheckpointError(f"{path} has checkpoint format {self.state.get('format')!r}; this hf_prune "
                                      f"reads format {FORMAT}. Delete the folder and start again.")

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
                                      "or delete the folder. Nothing was changed.")
            if old.get("model") != prints["model"]:
                raise CheckpointError(f"the checkpoint in {self.folder!r} belongs to another model (its weights, "
                                      "shapes or config differ); resume with the same unpruned model, freshly loaded, "
                                      "or delete the folder. Nothing was changed.")
            if old.get("data") != prints["data"]:
                raise CheckpointError(f"the checkpoint in {self.folder!r} was made with other calibration data; "
                                      "resume with the same dataset, samples, seq_len and seed, or delete the folder. "
                                      "Nothing was changed.")
            if self.state.get("stages") != stage_names:
                raise CheckpointError(f"the checkpoint walked stages {self.state.get('stages')}, this run walks "
                                      f"{stage_names}; delete the folder and start again.")
            rng = self.state.get("rng")
            if rng:
                torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng)), dtype=torch.uint8))
        else:
            os.makedirs(os.path.join(self.folder, "blocks"), exist_ok=True)
            self.state = {"format": FORMAT, "fingerprints": prints, "config": _config_dict(config),
                          "method": config.method, "stages": stage_names, "position": None, "blocks": [],
                          "inputs": None, "processor": None, "extras": {}, "complete": False}
            self._commit()
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
        file = os.path.join("blocks", f"{stage_index:02d}-{block_index:04d}.safetensors")
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
        if kill_after and self.saves >= int(kill_after):  # deterministic crash for the resume tests
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self) -> None:
        self.state["complete"] = True
        self._commit()

    def _commit(self) -> None:
        with atomic_file(os.path.join(self.folder, STATE)) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.state, fh, indent=1, sort_keys=True, default=str)


def resumable_methods() -> list[str]:
    """The registered methods that checkpoint and resume (their spec says ``resumable``)."""
    return sorted(spec.name for spec in method_specs() if spec.resumable)
