"""Models whose weights accelerate keeps off the modules (CPU or disk offload, ``device_map`` with "cpu"/"disk").

accelerate's ``AlignDevicesHook(offload=True)`` leaves an offloaded module's tensors on the ``meta`` device and
puts the real values (read from its ``weights_map``: a CPU dict, or memory-mapped files / safetensors on disk)
on the module only for the duration of its forward pass. An in-place edit of ``module.weight`` would be lost.
The walker therefore handles such a block itself (``onloaded``): it suspends the block's hooks, reads every
offloaded tensor onto the execution device, lets the method work on real tensors, then **writes the block's
tensors back into the weights map** (in place for CPU dicts; new per-tensor ``.dat`` files in the offload folder,
with the index updated, for disk) and releases them, so a later forward or ``save_pretrained`` sees the pruned
values and only one block is materialised at a time. The original checkpoint files are never written to.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import OffloadError


def _align_hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several
    return [h for h in hooks if type(h).__name__ == "AlignDevicesHook"]


def is_dispatched(module: nn.Module) -> bool:
    """True when accelerate hooks (``device_map``/``dispatch_model``/``cpu_offload``) manage part of ``module``."""
    return any(getattr(m, "_hf_hook", None) is not None for m in module.modules())


def hook_execution_device(model: nn.Module) -> torch.device | None:
    """The execution device accelerate's hooks run the model on (the first one found), if dispatched."""
    for module in model.modules():
        for hook in _align_hooks(module):
            if hook.execution_device is not None:
                device = hook.execution_device
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def _store(weights_map: Mapping, name: str) -> tuple[Mapping, str]:
    """(the underlying store, the key of ``name`` in it): unwraps accelerate's ``PrefixedDataset``."""
    store, key = weights_map, name
    while hasattr(store, "dataset") and hasattr(store, "prefix"):
        key = f"{store.prefix}{key}"
        store = store.dataset
    return store, key


def _holds(store: Mapping, key: str) -> bool:
    if hasattr(store, "index") and hasattr(store, "state_dict"):  # OffloadedWeightsLoader: never load to check
        return key in store.state_dict or key in store.index
    return key in store


def _scratch_folder(store) -> str:
    """A folder for rewritten tensors when the model was loaded without ``offload_folder`` (all safetensors)."""
    folder = tempfile.mkdtemp(prefix="hf_prune_offload-")
    weakref.finalize(store, shutil.rmtree, folder, True)
    store.save_folder = folder
    return folder


def _write(weights_map: Mapping, name: str, value: torch.Tensor) -> None:
    from accelerate.utils import offload_weight

    store, key = _store(weights_map, name)
    value = value.detach()
    if hasattr(store, "index") and hasattr(store, "state_dict") and key not in store.state_dict:
        # disk: a new memory-mapped .dat file in the offload folder and its index entry (accelerate's own format);
        # the entry no longer points at the checkpoint's safetensors file, which stays untouched
        folder = store.save_folder or _scratch_folder(store)
        offload_weight(value.to("cpu").contiguous(), key, folder, index=store.index)
        return
    target = store.state_dict if hasattr(store, "state_dict") and not isinstance(store, MutableMapping) else store
    if not isinstance(target, MutableMapping):
        raise OffloadError(f"cannot write the pruned {name} back: its accelerate weights map is a read-only "
                           f"{type(store).__name__}; load the model with device_map/offload_folder or cpu_offload.")
    old = target.get(key)
    if old is not None and old.shape == value.shape and old.dtype == value.dtype and old.device.type != "meta":
        if old.data_ptr() != value.data_ptr():
            old.copy_(value)  # in place: tied-pointer bookkeeping and other references see the new values
    else:
        target[key] = value.to("cpu").clone()


@dataclass
class OffloadedTensor:
    """One tensor held in an accelerate weights map: ``module`` (the hooked module) and its ``name`` there."""

    module: nn.Module
    name: str
    weights_map: Mapping

    def held(self) -> bool:
        return _holds(*_store(self.weights_map, self.name))

    def read(self) -> torch.Tensor:
        return self.weights_map[self.name]

    def write(self, value: torch.Tensor) -> None:
        _write(self.weights_map, self.name, value)

    def current(self) -> torch.Tensor:
        owner = self.module
        *path, leaf = self.name.split(".")
        for part in path:
            owner = getattr(owner, part)
        return getattr(owner, leaf)


def offloaded_tensors(root: nn.Module, prefix: str = "") -> dict[str, OffloadedTensor]:
    """``{full name: OffloadedTensor}`` for every tensor of ``root`` that an offloading hook keeps in a weights map."""
    from accelerate.utils import named_module_tensors

    found: dict[str, OffloadedTensor] = {}
    for module_name, module in root.named_modules(prefix=prefix):
        for hook in _align_hooks(module):
            if not hook.offload or hook.weights_map is None:
                continue
            for name, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                recurse=hook.place_submodules, remove_non_persistent=True):
                found[f"{module_name}.{name}" if module_name else name] = OffloadedTensor(module, name,
                                                                                        hook.weights_map)
    return found


def _named_tensors(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(prefix=prefix)
    yield from module.named_buffers(prefix=prefix)


def check_placement(model: nn.Module) -> None:
    """Every ``meta`` tensor must be one that an accelerate hook can read from its weights map; else an
    ``OffloadError`` (raised before anything is touched)."""
    meta = [name for name, t in _named_tensors(model) if t.device.type == "meta"]
    if not meta:
        return
    held = offloaded_tensors(model)
    missing = [name for name in meta if name not in held or not held[name].held()]
    if missing:
        raise OffloadError(
            f"{len(missing)} weights (e.g. {missing[0]}) are on the 'meta' device without an accelerate weights map "
            "holding their values (an empty model, or one dispatched to 'meta'); load the model with real weights, "
            "e.g. from_pretrained(path, device_map='auto', max_memory=..., offload_folder=...). Nothing was pruned.")


def read_tensor(model: nn.Module, name: str, offloaded: dict[str, OffloadedTensor] | None = None) -> torch.Tensor:
    """The value of parameter/buffer ``name`` of ``model``: the module's own, or read from its weights map."""
    tensor = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
    if tensor.device.type != "meta":
        return tensor
    holder = (offloaded if offloaded is not None else offloaded_tensors(model)).get(name)
    if holder is None:
        raise OffloadError(f"{name} is on the 'meta' device and no accelerate weights map holds it.")
    return holder.read()


def module_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, read from its weights map when the module is offloaded."""
    weight = module.weight
    if weight.device.type != "meta":
        return weight
    return read_tensor(module, "weight")


def iter_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, value) of every parameter, offloaded ones read one at a time (peak: one tensor)."""
    offloaded = offloaded_tensors(model)
    for name, tensor in model.named_parameters():
        yield name, (offloaded[name].read() if tensor.device.type == "meta" and name in offloaded else tensor)


def write_tensors(block: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` (names relative to ``block``) into the block: in place, or into the weights map."""
    offloaded = offloaded_tensors(block)
    current = dict(_named_tensors(block))
    with torch.no_grad():
        for name, value in values.items():
            if name in offloaded:
                offloaded[name].write(value)
            elif name in current:
                current[name].copy_(value)
            else:
                raise OffloadError(f"cannot restore {name}: the block has no such tensor.")


@contextlib.contextmanager
def onloaded(block: nn.Module, device: torch.device):
    """Put a (partly) offloaded block on ``device`` with its accelerate hooks suspended.

    On normal exit the offloaded tensors are written back into their weights maps; in every case they are then
    released (back to ``meta``), resident tensors go back to where they were and the hooks are restored. After an
    exception nothing is written back, so the offloaded weights stay as they were before the block."""
    from accelerate.hooks import ModelHook
    from accelerate.utils import set_module_tensor_to_device

    offloaded = offloaded_tensors(block)
    resident = [(t, t.device) for name, t in _named_tensors(block) if name not in offloaded]
    hooked = [(m, m._hf_hook) for m in block.modules() if getattr(m, "_hf_hook", None) is not None]
    for module, _ in hooked:
        module._hf_hook = ModelHook()  # the forward wrapper calls module._hf_hook: now a no-op
    try:
        for holder in offloaded.values():
            set_module_tensor_to_device(holder.module, holder.name, device, value=holder.read())
        for tensor, _ in resident:
            tensor.data = tensor.data.to(device)
        yield block
        for holder in offloaded.values():
            holder.write(holder.current())
    finally:
        for holder in offloaded.values():
            set_module_tensor_to_device(holder.module, holder.name, "meta")
        for tensor, home in resident:
            tensor.data = tensor.data.to(home)
        for module, hook in hooked:
            module._hf_hook = hook


def offloaded_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A state dict with the offloaded tensors read from their maps, for models accelerate's ``save_pretrained``
    does not treat as offloaded (``cpu_offload``/``dispatch_model`` without ``hf_device_map``); None otherwise."""
    device_map = getattr(model, "hf_device_map", None) or {}
    if not any(t.device.type == "meta" for _, t in _named_tensors(model)) or \
            {"cpu", "disk"} & set(map(str, device_map.values())):
        return None
    offloaded = offloaded_tensors(model)
    state = model.state_dict()
    return {k: (offloaded[k].read() if v.device.type == "meta" and k in offloaded else v) for k, v in state.items()}


def offload_folders(model: nn.Module) -> list[str]:
    """The folders the walker writes pruned tensors of disk-offloaded weights into (accelerate's offload folder)."""
    folders = set()
    for holder in offloaded_tensors(model).values():
        store, _ = _store(holder.weights_map, holder.name)
        folder = getattr(store, "save_folder", None)
        if folder and hasattr(store, "index"):
            folders.add(str(folder))
    return sorted(folders)


def describe_offload(model: nn.Module) -> dict | None:
    """What the report says about offload: how many tensors lived in which kind of weights map."""
    offloaded = offloaded_tensors(model)
    if not offloaded:
        return None
    kinds: dict[str, int] = {}
    for holder in offloaded.values():
        store, key = _store(holder.weights_map, holder.name)
        on_disk = hasattr(store, "index") and key in getattr(store, "index", {}) and \
            key not in getattr(store, "state_dict", {})
        kinds["disk" if on_disk else "cpu"] = kinds.get("disk" if on_disk else "cpu", 0) + 1
    return {"offloaded_tensors": kinds, "device_map": {k: str(v) for k, v in
                                                        (getattr(model, "hf_device_map", None) or {}).items()}}

