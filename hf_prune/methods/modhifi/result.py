"""What a ModHiFi run reports: sizes and FLOPs before/after, per-layer widths and reconstruction errors
(pruning), forget/remain accuracy before/after (unlearning); and the result object that prints them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from ...engine.report import RunMeter, format_table, module_entry
from ...engine.run import RunContext
from ...result import PruningResult

if TYPE_CHECKING:  # pragma: no cover
    from ...structured import MLPGroup

FLOPS_NOTE = ("2 x in x out of every nn.Linear of the model, per token (per patch for vision); attention "
              "score/value products, convolutions and norms are not counted")


def size_summary(model: nn.Module, groups: list["MLPGroup"] | None = None) -> dict:
    """Parameters, Linear FLOPs per token, and MLP neurons of ``model`` now."""
    params = sum(p.numel() for p in model.parameters())
    flops = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    out = {"parameters": params, "linear_flops_per_token": flops}
    if groups is not None:
        out["mlp_neurons"] = sum(model.get_submodule(g.output).in_features for g in groups)
    return out


def _change(before: dict, after: dict) -> dict:
    out = {}
    for key in before:
        b, a = before[key], after[key]
        out[key] = {"before": b, "after": a, "removed_fraction": (b - a) / b if b else 0.0}
    return out


def _load_line(model: nn.Module, uniform: bool) -> str:
    cls = type(model).__name__
    if uniform:
        return (f"The stock config holds the new widths: `transformers.{cls}.from_pretrained(folder)` loads it "
                "with no code of hf_prune.")
    return ("The blocks have different widths, which a stock config cannot hold: the folder carries "
            "`hf_prune_layout.py`, and `transformers.AutoModel...from_pretrained(folder, trust_remote_code=True)` "
            "loads it (stock transformers, no hf_prune needed).")


def prune_report(run: RunContext, config: Any, plans: dict, provenance: dict, meter: RunMeter, before: dict,
                 after: dict, config_widths: dict) -> dict:
    """The report of a ModHiFi-P run: neurons, parameters and Linear FLOPs before/after, and per block its widths,
    reconstruction errors and steps."""
    model = run.model
    layers, entries, block_of = {}, {}, {}
    for block, plan in plans.items():
        group = plan.group
        last = plan.steps[-1] if plan.steps else {}
        layers[block] = {
            "output": group.output,
            "width_before": plan.original_width,
            "width_after": group.width,
            "reconstruction_error": last.get("reconstruction_error"),
            "reconstruction_error_uncompensated": last.get("reconstruction_error_uncompensated"),
            "dead_neurons": last.get("dead_neurons"),
            "damp": last.get("damp"),
            "steps": plan.steps,
        }
        for name in (*group.inputs, group.output):
            entries[name] = module_entry(model.get_submodule(name).weight.detach(), None, None)
            block_of[name] = block
    change = _change(before, after)
    uniform = all(w is not None for w in config_widths.values())
    structured = {
        "unit": config.unit,
        "score": config.score,
        "selection": config.selection,
        "compensation": config.compensation,
        "neurons": change["mlp_neurons"],
        "parameters": change["parameters"],
        "linear_flops_per_token": change["linear_flops_per_token"],
        "flops_definition": FLOPS_NOTE,
        "config_widths": config_widths,
        "uniform_widths": uniform,
        "reload": "stock from_pretrained" if uniform else "AutoModel*.from_pretrained(..., trust_remote_code=True)",
        "layers": layers,
    }
    n, p = change["mlp_neurons"], change["parameters"]
    note = (f"ModHiFi removed {n['before'] - n['after']:,} of {n['before']:,} MLP hidden neurons "
            f"({100 * n['removed_fraction']:.1f}%, score `{config.score}`, selection `{config.selection}`, "
            f"compensation `{config.compensation}`): the tensors are physically smaller, {p['before']:,} -> "
            f"{p['after']:,} parameters ({100 * p['removed_fraction']:.1f}% fewer) and "
            f"{100 * change['linear_flops_per_token']['removed_fraction']:.1f}% fewer Linear FLOPs per token, so the "
            f"file is smaller and the model runs faster on stock kernels. {_load_line(model, uniform)} "
            "Per-layer widths and reconstruction errors (1 - fidelity) are in `pruning_report.json`.")
    return run.report(config, mode="prune", pattern=config.unit, entries=entries, block_of=block_of,
                      calibration=provenance, meter=meter, sections={"structured": structured, "structured_note": note})


@dataclass
class ModHiFiResult(PruningResult):
    """A ``PruningResult`` whose ``sparsity`` is the fraction of MLP neurons removed (pruning) and whose
    summary prints widths, sizes and errors (pruning) or accuracies (unlearning)."""

    @property
    def sparsity(self) -> float:
        structured = self.report.get("structured")
        if structured is None:
            return super().sparsity
        return structured["neurons"]["removed_fraction"]

    def summary(self) -> str:
        rep = self.report
        run = rep["run"]
        peak = run.get("peak_rss_bytes")
        head = (f"method={rep['method']} mode={rep['mode']} model={rep['model']['class']} time={run['time_s']:.2f}s"
                + (f" peak_rss={peak / 2**20:.0f}MiB" if peak else ""))
        if rep["mode"] == "unlearn":
            u = rep["unlearning"]
            rows = [[k, _pct(u["before"].get(k)), _pct(u["after"].get(k))]
                    for k in ("forget_accuracy", "remain_accuracy")]
            return "\n".join([head, f"forgot class {u['forget_class']} (edit: {u['edit']}, "
                                    f"{u['edited_components']:,} components in {len(u['layers'])} layers)",
                              format_table(rows, ["metric", "before", "after"])])
        s = rep["structured"]
        rows = []
        for block, layer in s["layers"].items():
            err = layer["reconstruction_error"]
            raw = layer["reconstruction_error_uncompensated"]
            rows.append([block, f"{layer['width_before']} -> {layer['width_after']}",
                         "-" if err is None else f"{err:.4f}", "-" if raw is None else f"{raw:.4f}"])
        totals = [[k.replace("_", " "), f"{v['before']:,}", f"{v['after']:,}", f"{100 * v['removed_fraction']:.1f}%"]
                  for k, v in ((k, s[k]) for k in ("neurons", "parameters", "linear_flops_per_token"))]
        return "\n".join([head, format_table(rows, ["block", "MLP width", "1 - fidelity", "uncompensated"]),
                          format_table(totals, ["", "before", "after", "removed"])])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
