"""Which method prunes which family, from what is registered: every one-shot method's ``serves`` capability
(``hf_prune.registry.MethodSpec``) asked about a model of each family. ``Pruner.prune`` refuses exactly the cells
marked "-" with the same reason, so the README's table (made by ``support_table``) is true by construction.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .models import family_for_type, get_family
from .models.spec import model_type_of
from .registry import MethodSpec, method_specs


def refusal(spec: MethodSpec, model: nn.Module) -> str | None:
    """Why ``spec``'s method (with its default config) refuses ``model``; None when it prunes it."""
    if spec.serves is None:
        return None
    try:
        return spec.serves(model, None)
    except ValueError as exc:  # an HFPruneError, or a target check's ValueError
        return str(exc)


def one_shot_methods() -> list[MethodSpec]:
    return [spec for spec in method_specs() if spec.kind == "one-shot"]


def support_rows(models: Mapping[str, nn.Module]) -> list[dict]:
    """Per model (``{label: model}``): its family, how its blocks are found, its stages and, per one-shot method,
    None (it prunes it) or the reason it refuses it."""
    rows = []
    for label, model in models.items():
        family = get_family(model)
        registered = family_for_type(model_type_of(model)) is not None
        stages = family.stages(model)
        rows.append({"label": label, "class": type(model).__name__, "model_type": model_type_of(model),
                     "found_by": "family file" if registered else "generic discovery",
                     "stages": [s.name for s in stages],
                     "methods": {spec.display_name: refusal(spec, model) for spec in one_shot_methods()}})
    return rows


def support_table(models: Mapping[str, nn.Module]) -> str:
    """The markdown table of ``support_rows``: ✓ where the method prunes the family, - where it refuses it."""
    rows = support_rows(models)
    methods = [spec.display_name for spec in one_shot_methods()]
    lines = ["| model (`model_type`) | blocks found by | stages walked | " + " | ".join(methods) + " |",
             "|---" * (3 + len(methods)) + "|"]
    for row in rows:
        cells = ["✓" if row["methods"][m] is None else "-" for m in methods]
        lines.append(f"| {row['class']} (`{row['model_type']}`) | {row['found_by']} | "
                     f"{' → '.join(row['stages'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
