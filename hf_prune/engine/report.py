"""What a pruning run reports: achieved sparsity (per module, per block, overall), time, peak memory,
calibration provenance and the software it ran on. Plain JSON-ready dicts."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..patterns import Pattern, nm_violations
from ..version import __version__
from .offload import iter_tensors


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class RunMeter:
    """Wall time and peak memory of a run (peak RSS from the kernel's high-water mark, reset at start)."""

    start: float = 0.0
    seconds: float = 0.0
    rss_reset: bool = False
    peak_rss: int | None = None
    peak_cuda: int | None = None
    phases: dict = field(default_factory=dict)

    def __enter__(self) -> "RunMeter":
        self.rss_reset = _reset_vm_hwm()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.peak_rss = _vm_hwm_bytes()
        if torch.cuda.is_available():
            self.peak_cuda = int(torch.cuda.max_memory_allocated())

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)

    def to_dict(self) -> dict:
        return {
            "time_s": round(self.seconds, 4),
            "phases_s": {k: round(v, 4) for k, v in self.phases.items()},
            "peak_rss_bytes": self.peak_rss,
            "peak_rss_scope": "this run" if self.rss_reset else "process lifetime",
            "peak_cuda_bytes": self.peak_cuda,
        }


class _Phase:
    def __init__(self, meter: RunMeter, name: str):
        self.meter, self.name = meter, name

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.meter.phases[self.name] = self.meter.phases.get(self.name, 0.0) + time.perf_counter() - self.t


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str | None = None) -> dict:
    import transformers

    return {
        "hf_prune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **{name: _version(name) for name in ("accelerate", "peft", "datasets", "huggingface_hub")},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device) if device is not None else None,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def count_zeros(tensor: torch.Tensor) -> int:
    """Exact zeros of a tensor by one reduction (``count_nonzero``: no temporary of the tensor's size)."""
    return tensor.numel() - int(torch.count_nonzero(tensor))


def module_entry(weight: torch.Tensor, target: float | None, pattern: Pattern | None, zeros: int | None = None) -> dict:
    """``zeros``: the weight's zeros when already counted (as the weight was zeroed); counted here otherwise."""
    zeros = count_zeros(weight) if zeros is None else zeros
    numel = weight.numel()
    entry = {"shape": list(weight.shape), "numel": numel, "zeros": zeros, "achieved": zeros / max(1, numel)}
    if target is not None:
        entry["target"] = target
    if pattern is not None and pattern.is_nm:
        entry["nm_violations"] = nm_violations(weight, pattern.n, pattern.m)
    return entry


def aggregate(entries: dict[str, dict]) -> dict:
    zeros = sum(e["zeros"] for e in entries.values())
    numel = sum(e["numel"] for e in entries.values())
    return {"zeros": zeros, "numel": numel, "achieved": zeros / max(1, numel), "modules": len(entries)}


def group_by(entries: dict[str, dict], key) -> dict[str, dict]:
    groups: dict[str, dict[str, dict]] = {}
    for name, entry in entries.items():
        groups.setdefault(key(name), {})[name] = entry
    return {k: aggregate(v) for k, v in groups.items()}


def module_kind(name: str) -> str:
    """The module's role without its block index, e.g. 'self_attn.q_proj' or 'mlp.down_proj'."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[i + 1:]) or name
    return name


def model_totals(model: nn.Module, counted: dict[str, dict] | None = None) -> dict:
    """Parameters and zeros of the whole model. ``counted``: ``{module_name: entry}`` of modules whose weight's zeros
    the report already counted (``module_entry``); their weights are not read again, every other parameter is
    counted by one reduction."""
    known = {f"{name}.weight": entry for name, entry in (counted or {}).items()}
    params = zeros = 0
    # offloaded weights are read from their maps, one at a time
    for name, p in iter_tensors(model):
        params += p.numel()
        entry = known.get(name)
        reuse = (entry is not None and entry.get("shape") == list(p.shape) and "stored_zeros" not in entry)
        zeros += entry["zeros"] if reuse else count_zeros(p)
    return {"parameters": params, "zeros": zeros, "sparsity": zeros / max(1, params)}


def model_record(model: nn.Module, family: str, stages: list) -> dict:
    """What a report says about the model: class, type, origin, family, the stages walked, dtype."""
    first = next(model.parameters())
    return {
        "class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "name_or_path": getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None),
        "family": family,
        "stages": [{"name": s.name, "path": s.path, "blocks": len(s.blocks(model))} for s in stages],
        "dtype": str(first.dtype).replace("torch.", ""),
    }


def sparsity_section(entries: dict[str, dict], block_of: dict[str, str]) -> dict:
    return {
        "overall": aggregate(entries),
        "per_block": group_by(entries, lambda n: block_of.get(n, "")),
        "per_module_kind": group_by(entries, module_kind),
        "per_module": entries,
    }


def run_report(model: nn.Module, family: str, stages: list, config: Any, *, pattern: str, entries: dict[str, dict],
               block_of: dict[str, str], calibration: dict, meter: RunMeter, device: torch.device | str | None,
               mode: str | None = None, record: dict | None = None, sections: dict | None = None) -> dict:
    """The report of one run, JSON-ready, with the sections every method writes in one order: method, ``mode``
    (when the method has modes), config, pattern, model, calibration, sparsity (of ``entries``, grouped by
    ``block_of``), model_totals, the method's own ``sections``, run, environment.

    ``record``: the model record when the method describes the model its own way (default ``model_record``)."""
    report: dict[str, Any] = {"method": config.method}
    if mode is not None:
        report["mode"] = mode
    report.update({
        "config": config.to_dict(),
        "pattern": pattern,
        "model": record if record is not None else model_record(model, family, stages),
        "calibration": calibration,
        "sparsity": sparsity_section(entries, block_of),
        "model_totals": model_totals(model, counted=entries),  # the modules' zeros are counted once
        **(sections or {}),
        "run": meter.to_dict(),
        "environment": environment(device),
    })
    return report


def format_table(rows: list[list], headers: list[str]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, sep, *body])


def sparsity_table(sparsity: dict) -> str:
    """The per-module-kind table of a report's ``sparsity`` section (modules and achieved sparsity per kind, then
    overall), as ``PruningResult.summary()`` and ``hf-prune report`` print it."""
    rows = [[kind, agg["modules"], f"{agg['achieved']:.4f}"]
            for kind, agg in sorted(sparsity["per_module_kind"].items())]
    rows.append(["overall", sparsity["overall"]["modules"], f"{sparsity['overall']['achieved']:.4f}"])
    return format_table(rows, ["module kind", "modules", "achieved sparsity"])
