"""``SolutionPath``: the artifact one SPP search (or one training-free pass) produces, and every model read off it.

Two kinds:

- ``"structured"`` (the Trainer search): per mask unit (a block's qk / vo / mlp entries) the first-entry and
  last-exit path times, z, Gamma, alpha and on-counts, plus what each entry costs. ``masks_at`` ranks the entries
  once and keeps a prefix, so the masks are nested across sparsities; ``materialize`` slices the kept structures
  out into a physically smaller model with the masked model's outputs.
- ``"unstructured"`` (the training-free LLM variant, ours): per Linear layer each weight's rank on the path
  (0 = the weight that stays longest) and the path times at every 1% of the matrix. ``masks_at`` keeps the first
  (1 - s) of every matrix; ``apply`` zeroes the rest (the model keeps its shapes: unstructured sparsity cannot
  make it smaller).

On disk: ``solution_path.safetensors`` (the tensors) and ``solution_path.json`` (kind, units, the SPPConfig,
the model it came from, the search schedule), with the path picture and a ``README.md`` card, written atomically.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from typing import Any

import torch
from torch import nn

from ...artifacts.cards import CARD_NAME, card_data, framework_versions, hub_base_model, render_card
from ...artifacts.hub import load_files, push_pretrained
from ...artifacts.plots import PLOT_EXTRA_HINT, have_matplotlib
from ...artifacts.save import save_model_folder
from ...atomic import atomic_output_dir, check_folder_writable
from ...engine.report import environment
from ...models import get_family
from ...patterns import prune_count
from ...structured import (
    attention_groups,
    mlp_groups,
    set_attention_geometry,
    set_mlp_width,
    shrink_attention,
    shrink_mlp,
)
from ...version import __version__
from . import ops
from .config import BUDGETS, SCOPES, SPPConfig
from .units import MaskUnit, build_units, carries_masks

TENSORS_NAME = "solution_path.safetensors"
JSON_NAME = "solution_path.json"
PICTURE_NAME = "solution_path.png"
FORMAT_VERSION = 1
KINDS = ("structured", "unstructured")


class SolutionPath:
    """A whole family of pruned models from one search. See the module docstring.

    >>> path = SolutionPath.from_pretrained("spp-path/")
    >>> keep = path.masks_at(0.4)                  # nested: everything kept at 0.6 is kept at 0.4
    >>> small = path.materialize(model, 0.4)       # physically smaller, equal to the masked model
    """

    def __init__(self, kind: str, units: list[dict], tensors: dict[str, torch.Tensor], config: dict,
                 model: dict | None = None, search: dict | None = None):
        if kind not in KINDS:
            raise ValueError(f"SolutionPath kind={kind!r} is not one of {KINDS}.")
        self.kind = kind
        self.units = [dict(u) for u in units]
        self.tensors = tensors
        self.config = dict(config)
        self.model = dict(model or {})
        self.search = dict(search or {})
        self._check_tensors()

    # ---- basics ---------------------------------------------------------------------------------
    def _check_tensors(self) -> None:
        wanted = ("first_entry", "z", "on_count") if self.kind == "structured" else ("rank",)
        for i, unit in enumerate(self.units):
            for key in wanted:
                tensor = self.tensors.get(f"{i}.{key}")
                if tensor is None:
                    raise ValueError(f"the solution path lacks tensor '{i}.{key}' (unit {unit.get('name')!r}); the "
                                     "files are incomplete or from another tool.")
                if list(tensor.shape) != list(unit["shape"]):
                    raise ValueError(f"the solution path's tensor '{i}.{key}' has shape {list(tensor.shape)}, but "
                                     f"unit {unit['name']!r} has shape {unit['shape']}.")

    @property
    def names(self) -> list[str]:
        return [u["name"] for u in self.units]

    def __repr__(self) -> str:
        entries = sum(math.prod(u["shape"]) for u in self.units)
        return (f"SolutionPath(kind={self.kind!r}, units={len(self.units)}, entries={entries}, "
                f"model={self.model.get('class')!r}, search={self.search})")

    def _default(self, name: str, value: Any) -> Any:
        if value is not None:
            return value
        return self.config.get(name, SPPConfig.__dataclass_fields__[name].default)

    # ---- reading off ------------------------------------------------------------------------------
    def _entries(self, budget: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per unit: its entries' priority order (most important first) and the per-entry cost."""
        order = self.config.get("order", "first_entry")
        orders, costs = [], []
        for i, unit in enumerate(self.units):
            first = self.tensors[f"{i}.first_entry"].flatten()
            z = self.tensors[f"{i}.z"].flatten()
            count = self.tensors[f"{i}.on_count"].flatten()
            orders.append(ops.priority(first, z, count, order))
            costs.append(torch.full((first.numel(),), float(unit["cost"][budget]), dtype=torch.float64))
        return orders, costs

    def entered(self) -> int | None:
        """How many entries have entered the path (a finite ``first_entry``) in a structured path's search; None for
        an unstructured path, which ranks every weight at once."""
        if self.kind != "structured":
            return None
        return sum(int(torch.isfinite(self.tensors[f"{i}.first_entry"]).sum()) for i in range(len(self.units)))

    def empty_warning(self) -> str | None:
        """The warning for a structured path in which no entry has entered yet (a search too short), else None."""
        if self.entered() != 0:
            return None
        steps, time = self.search.get("steps"), self.search.get("time")
        when = f" after {steps} steps (path time {time:.4g})" if isinstance(time, (int, float)) else ""
        return (f"no entry of this solution path has entered yet{when}: the search stopped before any structure "
                "entered, so every read-off ranks structures by their current z alone, not by when they entered the "
                "path. Search longer (more max_steps, a larger lr or a smaller lam) before reading models off it.")

    def _check_read_off(self, sparsity: float, budget: str | None, scope: str | None) -> tuple[str, str]:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity!r} must be a number in [0, 1) (the fraction removed).")
        empty = self.empty_warning()
        if empty:
            warnings.warn(empty, stacklevel=3)
        budget, scope = self._default("budget", budget), self._default("scope", scope)
        if budget not in BUDGETS:
            raise ValueError(f"budget={budget!r} is not supported; choose one of {', '.join(BUDGETS)}.")
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} is not supported; choose one of {', '.join(SCOPES)}.")
        return budget, scope

    def masks_at(self, sparsity: float, budget: str | None = None, scope: str | None = None) -> dict[str, torch.Tensor]:
        """Boolean keep-masks (``True`` = kept) removing ``sparsity`` of the ``budget`` (``"params"``, ``"flops"``
        or ``"entries"``; default: the config's) in each group (``scope="per_group"``) or overall (``"global"``).

        Structured paths: ``{unit name: mask shaped like the unit}``; unstructured: ``{module name: [out, in]}``.
        Nested: the kept set at a higher sparsity is a subset of the kept set at a lower one. The removed cost is
        the closest achievable to the target (within half an entry's cost); every block keeps at least
        ``min_keep`` entries per group.
        """
        budget, scope = self._check_read_off(sparsity, budget, scope)
        if self.kind == "unstructured":
            out = {}
            for i, unit in enumerate(self.units):
                rank = self.tensors[f"{i}.rank"]
                keep_count = rank.numel() - prune_count(rank.numel(), sparsity)
                out[unit["name"]] = rank < keep_count
            return out
        min_keep = int(self.config.get("min_keep", 1))
        order_key = self.config.get("order", "first_entry")
        orders, costs = self._entries(budget)
        sizes = [math.prod(u["shape"]) for u in self.units]
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        keep = torch.zeros(sum(sizes), dtype=torch.bool)  # all units, flattened one after another
        pools: dict[str, list[int]] = {}
        for i, unit in enumerate(self.units):
            pools.setdefault(unit["kind"] if scope == "per_group" else "all", []).append(i)
        for members in pools.values():
            # each unit's top min_keep entries are always kept; the rest compete in one ranking
            flat, first, z, count, cost = [], [], [], [], []
            total = 0.0
            for i in members:
                total += float(costs[i].sum())
                keep[offsets[i] + orders[i][:min_keep]] = True
                rest = orders[i][min_keep:]
                flat.append(offsets[i] + rest)
                first.append(self.tensors[f"{i}.first_entry"].flatten()[rest])
                z.append(self.tensors[f"{i}.z"].flatten()[rest])
                count.append(self.tensors[f"{i}.on_count"].flatten()[rest])
                cost.append(costs[i][rest])
            flat = torch.cat(flat)
            order = ops.priority(torch.cat(first), torch.cat(z), torch.cat(count), order_key)
            removed = ops.removal_count(torch.cat(cost)[order.flip(0)], sparsity * total)
            keep[flat[order[: order.numel() - removed]]] = True
        return {u["name"]: part.view(u["shape"]) for u, part in zip(self.units, keep.split(sizes))}

    def read_off(self, sparsity: float, budget: str | None = None, scope: str | None = None) -> dict:
        """What reading ``sparsity`` off the path removes, per group and per block, in every budget unit."""
        budget, scope = self._check_read_off(sparsity, budget, scope)
        keep = self.masks_at(sparsity, budget, scope)
        out: dict[str, Any] = {"sparsity": sparsity, "budget": budget, "scope": scope,
                               "order": self.config.get("order", "first_entry"), "per_group": {}, "per_block": {}}
        for unit in self.units:
            mask = keep[unit["name"]]
            total, removed = mask.numel(), int((~mask).sum())
            for key, bucket in (("per_group", unit["kind"]), ("per_block", unit["block"])):
                agg = out[key].setdefault(bucket, {"entries": 0, "removed_entries": 0,
                                                   **{f"{b}_total": 0.0 for b in BUDGETS},
                                                   **{f"{b}_removed": 0.0 for b in BUDGETS}})
                agg["entries"] += total
                agg["removed_entries"] += removed
                for b in BUDGETS:
                    agg[f"{b}_total"] += total * unit["cost"][b]
                    agg[f"{b}_removed"] += removed * unit["cost"][b]
        totals = {b: sum(g[f"{b}_total"] for g in out["per_group"].values()) for b in BUDGETS}
        removed = {b: sum(g[f"{b}_removed"] for g in out["per_group"].values()) for b in BUDGETS}
        out["achieved"] = {b: removed[b] / totals[b] if totals[b] else 0.0 for b in BUDGETS}
        for group in [*out["per_group"].values(), *out["per_block"].values()]:
            group["achieved"] = {b: group[f"{b}_removed"] / group[f"{b}_total"] if group[f"{b}_total"] else 0.0
                                 for b in BUDGETS}
        return out

    # ---- applying to a model ----------------------------------------------------------------------
    def _check_model(self, model: nn.Module) -> list[MaskUnit]:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a transformers model (torch.nn.Module), got {type(model).__name__}.")
        if carries_masks(model):
            raise ValueError("the model still carries SPP masks (model.hf_prune_spp); call "
                             "SPPMasks.find(model).remove(model) before reading a model off the path.")
        if self.kind == "unstructured":
            for unit in self.units:
                try:
                    module = model.get_submodule(unit["name"])
                except AttributeError:
                    raise ValueError(f"the path's module {unit['name']!r} is not in {type(model).__name__}; this path "
                                     f"was made on a {self.model.get('class')}.") from None
                if not isinstance(module, nn.Linear) or list(module.weight.shape) != list(unit["shape"]):
                    raise ValueError(f"{unit['name']} is not an nn.Linear of shape {unit['shape']} in the given "
                                     f"model; this path was made on another model ({self.model.get('class')}).")
            return []
        config = SPPConfig.from_dict(self.config)
        try:
            units = build_units(model, config)
        except ValueError as exc:
            raise ValueError(f"the model does not fit this solution path: {exc}") from None
        mine = [(u["name"], list(u["shape"]), u["kind"]) for u in self.units]
        theirs = [(u.name, list(u.shape), u.kind) for u in units]
        if mine != theirs:
            diff = next(((a, b) for a, b in zip(mine, theirs) if a != b),
                        (mine[len(theirs):][:1], theirs[len(mine):][:1]))
            raise ValueError(f"the model does not fit this solution path (searched on {self.model.get('class')}): "
                             f"path unit {diff[0]} vs model unit {diff[1]}. Read the path off the model it was "
                             "searched on (before any other structural change).")
        return units

    def apply(self, model: nn.Module, sparsity: float, *, budget: str | None = None, scope: str | None = None,
              inplace: bool = False) -> nn.Module:
        """The *masked* model at ``sparsity``: removed structures (or weights) zeroed, shapes unchanged.

        Structured: the rows of k and v and the input columns of the MLP's output Linear that the masks multiply.
        Returns a copy unless ``inplace``."""
        units = self._check_model(model)
        keep = self.masks_at(sparsity, budget, scope)
        target = model if inplace else copy.deepcopy(model)
        with torch.no_grad():
            if self.kind == "unstructured":
                for unit in self.units:
                    weight = target.get_submodule(unit["name"]).weight
                    weight.masked_fill_(~keep[unit["name"]].to(weight.device), 0)
                return target
            for unit in units:
                mask = unit.expand(keep[unit.name].float()).bool()
                linear = target.get_submodule(unit.module)
                drop = ~mask.to(linear.weight.device)
                if unit.kind == "mlp":
                    linear.weight[:, drop] = 0
                else:
                    linear.weight[drop] = 0
                    if linear.bias is not None:
                        linear.bias[drop] = 0
        return target

    def materialize(self, model: nn.Module, sparsity: float, *, budget: str | None = None, scope: str | None = None,
                    inplace: bool = False) -> nn.Module:
        """A physically smaller model at ``sparsity`` whose outputs equal ``apply``'s (the masked model).

        Removed MLP neurons leave gate/up/down (fc1/fc2). Removed q-k and v-o dimensions leave q/k and v/o,
        and heads without v-o dimensions leave whole; every kept head of a block keeps the same width (see
        ``hf_prune.structured.attention``). With rotary embeddings the head width cannot change: removed
        dimensions are zeroed and only whole key/value groups leave. Uniform widths are written to the stock
        config (stock ``from_pretrained`` reloads the saved model); per-block widths are saved by
        ``save_model`` / ``Pruner.save_pretrained`` with a layout that stock transformers reloads through
        ``trust_remote_code=True``. Returns a copy unless ``inplace``.
        """

        if self.kind == "unstructured":
            raise ValueError("an unstructured (training-free) path zeroes single weights and cannot make a smaller "
                             "model; use path.apply(model, sparsity).")
        units = self._check_model(model)
        keep = self.masks_at(sparsity, budget, scope)
        target = model if inplace else copy.deepcopy(model)
        stages = get_family(target).stages(target)
        attention = {g.block: g for g in attention_groups(target, stages)}
        mlps = {g.block: g for g in mlp_groups(target, stages)}
        by_block: dict[str, dict[str, MaskUnit]] = {}
        for unit in units:
            by_block.setdefault(unit.block, {})[unit.kind] = unit
        for block, kinds in by_block.items():
            if "qk" in kinds or "vo" in kinds:
                group = attention[block]
                full = [torch.arange(group.head_dim) for _ in range(group.kv_heads)]
                qk = kinds["qk"].kept_dims(keep[kinds["qk"].name]) if "qk" in kinds else full
                vo = kinds["vo"].kept_dims(keep[kinds["vo"].name]) if "vo" in kinds else full
                shrink_attention(target, group, qk, vo)
            if "mlp" in kinds:
                shrink_mlp(target, mlps[block], kinds["mlp"].kept_dims(keep[kinds["mlp"].name]))
        for stage in stages:
            if stage.mlp is not None and len({g.width for g in mlp_groups(target, [stage])}) == 1:
                set_mlp_width(target, stage)
            if stage.attention is not None:
                set_attention_geometry(target, stage)
        return target

    # ---- persistence ------------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "hf_prune_version": __version__, "kind": self.kind,
                "units": self.units, "config": self.config, "model": self.model, "search": self.search}

    def save_pretrained(self, save_directory: str | os.PathLike, *, repo_id: str | None = None,
                        overwrite: bool = False) -> str:
        """Write ``solution_path.safetensors`` + ``solution_path.json``, the path picture ``solution_path.png``
        (when matplotlib is installed) and a ``README.md`` card, atomically; returns the folder. ``repo_id`` is
        the Hub id the card's usage snippet loads from. A folder holding a previous hf_prune output is replaced
        only with ``overwrite=True``; any other non-empty folder, and the searched model's own folder, are
        refused before anything is written."""
        from safetensors.torch import save_file

        with atomic_output_dir(save_directory, overwrite=overwrite, sources=(self.model.get("name_or_path"),)) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, os.path.join(tmp, TENSORS_NAME),
                      metadata={"format": "pt", "hf_prune_solution_path": str(FORMAT_VERSION)})
            with open(os.path.join(tmp, JSON_NAME), "w", encoding="utf-8") as fh:
                json.dump(self.to_json_dict(), fh, indent=2, sort_keys=True, allow_nan=False)
                fh.write("\n")
            picture = self.plot(os.path.join(tmp, PICTURE_NAME)) if have_matplotlib() else None
            self.model_card(repo_id=repo_id, picture=PICTURE_NAME if picture else None).save(
                os.path.join(tmp, CARD_NAME))
        return os.path.abspath(os.fspath(save_directory))

    def model_card(self, *, repo_id: str | None = None, picture: str | None = None):
        """The ``huggingface_hub.ModelCard`` of this path (``model_cards/solution_path.md.j2``)."""
        base = hub_base_model(self.model.get("name_or_path"))
        model_class = self.model.get("class") or "model"
        title = f"SPP solution path for {base.split('/')[-1] if base else model_class}"
        budget, scope = self._default("budget", None), self._default("scope", None)
        read_offs = [{"sparsity": s, "achieved": self.read_off(s, budget, scope)["achieved"]}
                     for s in (0.2, 0.4, 0.6, 0.8)]
        kinds = sorted({u["kind"] for u in self.units})
        shape_tag = "structured-pruning" if self.kind == "structured" else "unstructured-sparsity"
        metadata = card_data(base, title, ["spp", "solution-path", shape_tag])
        return render_card(
            metadata, "solution_path.md.j2", title=title, kind=self.kind, base_model=base, model_class=model_class,
            load_path=repo_id or "path/to/this/folder", budget=budget, scope=scope, read_offs=read_offs,
            units=len(self.units), groups=", ".join(kinds), entries=sum(math.prod(u["shape"]) for u in self.units),
            picture=picture, plot_hint=PLOT_EXTRA_HINT,
            search_items=sorted((k, v) for k, v in self.search.items() if not isinstance(v, (dict, list))),
            empty_warning=self.empty_warning(),
            config_json=json.dumps(self.config, indent=2, sort_keys=True),
            versions=framework_versions(environment()))

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, revision: str | None = None,
                        token: str | bool | None = None, subfolder: str | None = None) -> "SolutionPath":
        """Load a path from a folder written by ``save_pretrained`` or from a Hub repo."""
        from safetensors.torch import load_file

        files = load_files(path_or_repo, [JSON_NAME, TENSORS_NAME], what="the solution path",
                           writer="SolutionPath.save_pretrained", subfolder=subfolder, revision=revision, token=token)
        json_path, tensor_path = files[JSON_NAME], files[TENSORS_NAME]
        with open(json_path, encoding="utf-8") as fh:
            data = json.load(fh)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{json_path} has solution-path format {version!r}; this hf_prune ({__version__}) reads "
                             f"format {FORMAT_VERSION}.")
        return cls(data["kind"], data["units"], load_file(tensor_path), data["config"], data.get("model"),
                   data.get("search"))

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, create_pr: bool = False,
                    commit_message: str = "Upload SPP solution path with hf_prune", commit_description: str | None = None,
                    path_in_repo: str | None = None) -> Any:
        """Create ``repo_id`` if needed and upload the path (safetensors + JSON + picture + card) in one commit,
        through ``hf_prune.hub.push_pretrained``; returns ``huggingface_hub.CommitInfo``. Without network it raises
        ``hf_prune.errors.HubError`` naming the endpoint."""

        return push_pretrained(lambda folder: self.save_pretrained(folder, repo_id=repo_id), repo_id,
                               private=private, token=token, revision=revision, create_pr=create_pr,
                               commit_message=commit_message, commit_description=commit_description,
                               path_in_repo=path_in_repo)

    # ---- plot -----------------------------------------------------------------------------------
    def density_curves(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per group: (path times, density then). Structured paths pool the blocks of a group and count the entries
        that have entered (density grows from 0); unstructured (training-free) ones give each module the share of
        its weights not yet removed (density falls from 1), at every 1% of the matrix."""
        curves = {}
        if self.kind == "structured":
            pooled: dict[str, list[torch.Tensor]] = {}
            for i, unit in enumerate(self.units):
                pooled.setdefault(unit["kind"], []).append(self.tensors[f"{i}.first_entry"].flatten())
            for kind, parts in pooled.items():
                times = torch.cat(parts).double().sort().values
                density = torch.arange(1, times.numel() + 1, dtype=torch.float64) / times.numel()
                finite = torch.isfinite(times)
                curves[kind] = (times[finite], density[finite])
            return curves
        for i, unit in enumerate(self.units):
            curve = self.tensors.get(f"{i}.curve")
            if curve is not None:
                density = 1.0 - torch.linspace(0, 1, curve.numel(), dtype=torch.float64)
                keep = torch.isfinite(curve) & (curve > 0)
                curves[unit["name"]] = (curve.double()[keep], density[keep])
        return curves

    def plot(self, path: str | os.PathLike) -> str:
        """Write a PNG of density against path time per group (needs matplotlib: ``pip install hf-prune[plot]``)."""
        try:
            import matplotlib
        except ImportError:
            raise ImportError("SolutionPath.plot needs matplotlib: pip install 'hf-prune[plot]'.") from None
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = os.fspath(path)
        check_folder_writable(os.path.dirname(os.path.abspath(path)))
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        try:
            curves = {k: v for k, v in self.density_curves().items() if v[0].numel()}
            for name, (times, density) in curves.items():
                ax.step(times.numpy(), density.numpy(), where="post", label=name,
                        linewidth=1.5 if self.kind == "structured" else 0.8)
            if not curves:
                ax.text(0.5, 0.5, "no entry has entered the path yet", ha="center", transform=ax.transAxes)
            ax.set_xlabel("path time (cumulative learning rate)" if self.kind == "structured"
                          else "path time (per layer: removal pressure / RIA score)")
            ax.set_ylabel("density (fraction of entries on the path)" if self.kind == "structured"
                          else "density (fraction of weights not yet removed)")
            ax.set_ylim(0, 1.02)
            if self.kind == "unstructured":
                ax.set_xscale("log")
            if 0 < len(curves) <= 12:
                ax.legend(fontsize="small")
            ax.set_title(f"SPP solution path ({self.model.get('class') or 'model'})")
            fig.tight_layout()
            fig.savefig(path, format="png")
        finally:
            plt.close(fig)
        return path


def save_model(model: nn.Module, save_directory: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Save a materialized model atomically so that stock transformers reloads it: uniform widths live in its
    config (the plain class loads it); per-block widths add ``hf_prune_layout.py`` + ``auto_map``
    (``AutoModel...from_pretrained(folder, trust_remote_code=True)``). Returns the folder. A folder holding a
    previous hf_prune output is replaced only with ``overwrite=True``; any other non-empty folder is refused."""
    return save_model_folder(model, save_directory, overwrite=overwrite)
