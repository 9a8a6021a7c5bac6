"""Pictures for model cards (matplotlib is optional: ``pip install 'hf-prune[plot]'``)."""

from __future__ import annotations

import os
import re

from ..engine.report import aggregate, group_by, module_kind

SPARSITY_PICTURE = "sparsity_per_layer.png"
PLOT_EXTRA_HINT = "pip install 'hf-prune[plot]' (matplotlib)"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _original_shape(name: str, entry: dict, layers: dict) -> list[int]:
    """A pruned Linear's shape before structured removal: recorded (``original_shape``), or rebuilt from its
    block's MLP widths (ModHiFi: the output layer lost input columns, the others output rows)."""
    if entry.get("original_shape"):
        return list(entry["original_shape"])
    shape = list(entry["shape"])
    for layer in layers.values():
        if name == layer.get("output"):
            return [shape[0], layer["width_before"]]
    for block, layer in layers.items():
        if name.startswith(block + ".") and len(shape) == 2:
            return [layer["width_before"], shape[1]]
    return shape


def removal_view(report: dict) -> dict:
    """A structurally pruned model's report with its sparsity sections counting what was *removed* from the
    original weights (sliced out, or zeroed) instead of the zeros left in the smaller tensors, which are all
    zero after a clean removal. Each per-module entry gains ``original_shape``, ``weights_before``,
    ``weights_after`` and ``removed``. Reports of masking methods come back unchanged."""
    resized = report.get("structured") is not None or report.get("pattern") == "structured"
    if not resized:
        return report
    layers = (report.get("structured") or {}).get("layers") or {}
    entries = {}
    for name, entry in report["sparsity"]["per_module"].items():
        original = _original_shape(name, entry, layers)
        before = 1
        for d in original:
            before *= d
        stored = 1
        for d in entry["shape"]:
            stored *= d
        kept = stored - entry.get("stored_zeros", entry["zeros"] if not entry.get("original_shape") else 0)
        removed = before - kept
        entries[name] = {**entry, "original_shape": original, "weights_before": before, "weights_after": kept,
                         "removed": removed, "numel": before, "zeros": removed, "achieved": removed / max(1, before)}
    per_block = report["sparsity"].get("per_block") or {}
    blocks = sorted(per_block, key=len, reverse=True)

    def block_of(name: str) -> str:
        return next((b for b in blocks if name.startswith(b + ".")), "")

    sparsity = {**report["sparsity"], "per_module": entries, "overall": aggregate(entries),
                "per_block": {b: v for b, v in group_by(entries, block_of).items() if b},
                "per_module_kind": group_by(entries, module_kind)}
    return {**report, "sparsity": sparsity}


def layer_sparsity_table(report: dict) -> tuple[list[str], dict[str, list[float | None]], list[float]]:
    """(block names in walk order, {module kind: achieved sparsity per block (None where absent)},
    overall achieved sparsity per block) from a pruning report."""

    sp = report["sparsity"]
    stage_paths = [s["path"] for s in report.get("model", {}).get("stages", [])]

    def order(block: str) -> tuple:
        stage = next((i for i, p in enumerate(stage_paths) if block == p or block.startswith(p + ".")),
                     len(stage_paths))
        return stage, _natural(block)

    blocks = sorted(sp["per_block"], key=order)
    by_kind: dict[str, list[float | None]] = {}
    for name, entry in sp["per_module"].items():
        block = max((b for b in blocks if name.startswith(b + ".")), key=len, default=None)
        if block is None:
            continue
        values = by_kind.setdefault(module_kind(name), [None] * len(blocks))
        values[blocks.index(block)] = entry["achieved"]
    overall = [sp["per_block"][b]["achieved"] for b in blocks]
    return blocks, by_kind, overall


def plot_layer_sparsity(report: dict, path: str | os.PathLike, *, title: str | None = None) -> str | None:
    """Draw achieved sparsity per block (one line per module kind, the block's overall as a thick grey line; for a
    structurally pruned model: the share of the original weights removed) into a PNG
    at ``path``; returns the path, or None when matplotlib is not installed."""
    if not have_matplotlib():
        return None
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend change for the caller

    view = removal_view(report)
    blocks, by_kind, overall = layer_sparsity_table(view)
    fig = Figure(figsize=(10, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(blocks)))
    ax.plot(xs, overall, color="0.65", linewidth=4, label="block overall (thick grey)", zorder=1)
    for kind, values in sorted(by_kind.items()):
        pts = [(x, v) for x, v in zip(xs, values) if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linewidth=1, label=kind,
                zorder=2)
    ax.set_xlabel("block (walk order)")
    ax.set_ylabel("share of the original weights removed" if view is not report
                  else "achieved sparsity (fraction of zeros)")
    ax.set_ylim(-0.02, 1.02)
    step = max(1, len(blocks) // 16)
    ax.set_xticks(xs[::step])
    ax.set_xticklabels([_short(b) for b in blocks[::step]], rotation=45, ha="right", fontsize=7)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or f"{report.get('method')} ({report.get('pattern')}): sparsity per layer")
    ax.legend(fontsize=7, ncol=1 + len(by_kind) // 14, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png")
    return path


def _short(block: str) -> str:
    """``model.layers.3`` -> ``layers.3``; ``vision_model.encoder.layers.0`` -> ``vision_model.0``."""
    parts = block.split(".")
    if len(parts) >= 2 and parts[-1].isdigit():
        head = parts[0] if parts[0] not in ("model",) else parts[-2]
        return f"{head}.{parts[-1]}"
    return block
