"""``Allocation``: a per-module sparsity allocation as a first-class object.

An allocator (ECoFLaP today) decides *how much* to prune in each module; any layer-wise pruner then
decides *which* weights. The allocation carries its ``{module_name: sparsity}`` map, the groups it was
solved over (their scores, sizes and keep counts), the budgets and the provenance of the scores. It saves
to JSON, reloads, plots itself as a PNG, and plugs into any layer-wise config unchanged:

>>> allocation = Allocation.load("out/sparsity_allocation.json")
>>> WandaConfig(sparsity=allocation.sparsity, module_sparsity=allocation)   # no scores recomputed
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .engine.report import format_table
from .version import __version__

ALLOCATION_NAME = "sparsity_allocation.json"
PLOT_NAME = "sparsity_allocation.png"


def _check_sparsity_map(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"Allocation.module_sparsity must be a non-empty dict {{module_name: sparsity}}, got {value!r}.")
    out = {}
    for name, sparsity in value.items():
        ok = isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0.0 <= sparsity < 1.0
        if not isinstance(name, str) or not ok:
            raise ValueError(f"Allocation.module_sparsity[{name!r}]={sparsity!r} must be a number in [0, 1).")
        out[name] = float(sparsity)
    return out


@dataclass
class Allocation:
    """Per-module sparsities plus how they were obtained.

    - ``module_sparsity``: ``{module_name: sparsity}``, in the model's walk order;
    - ``sparsity``: the overall target the budgets were solved for;
    - ``groups``: ``{group: {"modules", "stage", "budget", "size", "score", "keep", "sparsity"}}``;
    - ``budgets``: ``{budget: {"groups", "size", "keep", "target", "allocated"}}`` (one per sub-model
      when each has its own budget, else one called ``"global"``);
    - ``provenance``: method, scores, loss, data, seeds, versions.
    """

    module_sparsity: dict[str, float]
    sparsity: float
    max_sparsity: float | None = None
    groups: dict[str, dict] = field(default_factory=dict)
    budgets: dict[str, dict] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.module_sparsity = _check_sparsity_map(self.module_sparsity)
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"Allocation.sparsity={self.sparsity!r} must be a number in [0, 1).")

    # ---- reading ----------------------------------------------------------------------------
    @property
    def kept(self) -> int:
        """Weights kept over all groups (from the integer keep counts)."""
        return sum(int(g["keep"]) for g in self.groups.values())

    @property
    def size(self) -> int:
        return sum(int(g["size"]) for g in self.groups.values())

    def stage_of(self, module: str) -> str:
        for group in self.groups.values():
            if module in group.get("modules", ()):
                return str(group.get("stage", ""))
        return ""

    def summary(self) -> str:
        rows = [[name, b["size"], f"{b['target']:.4f}", f"{b['allocated']:.4f}",
                 f"{min(self.groups[g]['sparsity'] for g in b['groups']):.4f}",
                 f"{max(self.groups[g]['sparsity'] for g in b['groups']):.4f}"] for name, b in self.budgets.items()]
        return format_table(rows, ["budget", "weights", "target", "allocated", "min group", "max group"])

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "hf_prune.allocation/1",
            "hf_prune_version": __version__,
            "sparsity": self.sparsity,
            "max_sparsity": self.max_sparsity,
            "module_sparsity": dict(self.module_sparsity),
            "groups": self.groups,
            "budgets": self.budgets,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Allocation":
        if not isinstance(data, dict) or "module_sparsity" not in data or "sparsity" not in data:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a sparsity allocation: expected keys 'module_sparsity' and 'sparsity', got {keys}.")
        return cls(module_sparsity=data["module_sparsity"], sparsity=data["sparsity"],
                   max_sparsity=data.get("max_sparsity"), groups=dict(data.get("groups") or {}),
                   budgets=dict(data.get("budgets") or {}), provenance=dict(data.get("provenance") or {}))

    def save(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Allocation":
        """From a JSON file written by :meth:`save`, or a folder written by ``Pruner.save_pretrained``."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, ALLOCATION_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no sparsity allocation at {path!r}; it is written by Pruner.save_pretrained "
                                    "after an allocating method or by Allocation.save.")
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    # ---- picture ----------------------------------------------------------------------------
    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> str:
        """Bar chart of every module's sparsity in walk order, coloured by sub-model, as a PNG.

        Needs matplotlib (``pip install hf-prune[plot]``); draws off-screen and leaves pyplot alone.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("Allocation.plot needs matplotlib: pip install 'hf-prune[plot]'.") from None
        names = list(self.module_sparsity)
        values = [self.module_sparsity[n] for n in names]
        stages = [self.stage_of(n) for n in names]
        palette = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]
        stage_colour = {s: palette[i % len(palette)] for i, s in enumerate(dict.fromkeys(stages))}
        width = min(18.0, max(6.0, 0.12 * len(names) + 3))
        fig = Figure(figsize=(width, 4.0), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        xs = list(range(len(names)))
        for stage, colour in stage_colour.items():
            idx = [i for i, s in enumerate(stages) if s == stage]
            ax.bar([xs[i] for i in idx], [values[i] for i in idx], width=0.85, color=colour, label=stage or "modules")
        ax.axhline(self.sparsity, color="black", linestyle="--", linewidth=1, label=f"target {self.sparsity:.2f}")
        if self.max_sparsity is not None:
            ax.axhline(self.max_sparsity, color="grey", linestyle=":", linewidth=1,
                       label=f"max_sparsity {self.max_sparsity:.2f}")
        ticks = _group_ticks(self, names)
        labels = [label for _, label in ticks]
        prefix = os.path.commonprefix(labels) if len(labels) > 1 else ""
        prefix = prefix[: prefix.rfind(".") + 1]
        ax.set_xticks([t for t, _ in ticks])
        ax.set_xticklabels([label[len(prefix):] for label in labels], rotation=60, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_xlabel(f"modules in walk order (ticks: groups{f', prefix {prefix!r}' if prefix else ''})", fontsize=8)
        high = max(values + [self.sparsity, self.max_sparsity or 0.0])
        ax.set_ylim(0.0, min(1.0, high + 0.12))
        ax.set_ylabel("sparsity (fraction removed)")
        method = self.provenance.get("method", "allocation")
        details = ", ".join(str(self.provenance[k]) for k in ("score", "granularity") if self.provenance.get(k))
        ax.set_title(title or f"{method} allocation: {len(names)} modules, {len(self.groups)} groups"
                              + (f" ({details})" if details else ""), fontsize=10)
        ax.legend(loc="upper center", fontsize=7, ncols=4, frameon=False)
        fig.tight_layout()
        path = os.fspath(path)
        fig.savefig(path, format="png")
        return path

    def save_pretrained(self, folder: str | os.PathLike) -> dict[str, str | None]:
        """Write ``sparsity_allocation.json`` (and its PNG when matplotlib is installed) into ``folder``."""
        folder = os.fspath(folder)
        files: dict[str, str | None] = {"json": ALLOCATION_NAME, "plot": None}
        self.save(os.path.join(folder, ALLOCATION_NAME))
        try:
            self.plot(os.path.join(folder, PLOT_NAME))
            files["plot"] = PLOT_NAME
        except ImportError:
            pass
        return files


def _group_ticks(allocation: Allocation, names: list[str]) -> list[tuple[float, str]]:
    """A tick per group (at the centre of its modules), thinned to at most ~48 labels."""
    position = {n: i for i, n in enumerate(names)}
    ticks = []
    for group, entry in allocation.groups.items():
        idx = [position[m] for m in entry.get("modules", ()) if m in position]
        if idx:
            ticks.append(((min(idx) + max(idx)) / 2, group))
    if not ticks:
        ticks = [(float(i), n) for i, n in enumerate(names)]
    step = max(1, math.ceil(len(ticks) / 48))
    return ticks[::step]
