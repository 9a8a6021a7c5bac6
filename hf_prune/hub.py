"""Model cards generated from the templates in ``model_cards/`` through ``huggingface_hub.ModelCard``."""

from __future__ import annotations

import json
import os
import re
from importlib import resources

TEMPLATE = "pruned_model.md.j2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

METHOD_NAMES = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "ria": "RIA",
                "modhifi": "ModHiFi"}

_PIPELINES = (
    ("ForCausalLM", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForImageClassification", "image-classification"),
    ("Blip2ForConditionalGeneration", "image-to-text"),
    ("CLIPModel", "zero-shot-image-classification"),
    ("Model", "feature-extraction"),
)


def template_path(name: str = TEMPLATE) -> str:
    return str(resources.files("hf_prune.model_cards").joinpath(name))


def hub_base_model(name_or_path: str | None) -> str | None:
    """The Hub id of the base model, or None for local paths (``base_model`` must be a Hub id)."""
    if not name_or_path or os.path.exists(name_or_path) or not _HUB_ID.match(name_or_path):
        return None
    return name_or_path


def pipeline_tag(model_class: str) -> str | None:
    for suffix, tag in _PIPELINES:
        if model_class.endswith(suffix):
            return tag
    return None


def pattern_tag(pattern: str) -> str:
    return "unstructured-sparsity" if pattern == "unstructured" else f"sparsity-{pattern.replace(':', 'of')}"


def build_model_card(report: dict, *, repo_id: str | None = None, evaluations: list[dict] | None = None):
    """A ``huggingface_hub.ModelCard`` for a pruned model, from its pruning report."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = report["config"]
    method = report["method"]
    model = report["model"]
    base = hub_base_model(model.get("name_or_path"))
    method_name = METHOD_NAMES.get(method, method)
    title = f"{base.split('/')[-1] if base else model['class']} pruned with {method_name} ({report.get('pattern')})"
    pattern = report.get("pattern") or config.get("pattern") or "unstructured"
    eval_results = []
    for e in evaluations or []:
        eval_results.append(EvalResult(task_type="text-generation", dataset_type=e["dataset"],
                                       dataset_name=e["dataset"], dataset_split=e.get("split"),
                                       metric_type=e["metric"], metric_value=e["value"],
                                       dataset_args={"seq_len": e.get("seq_len")}))
    card_data = ModelCardData(
        base_model=base,
        library_name="hf_prune",
        tags=["hf_prune", "pruned", method, pattern_tag(pattern)],
        pipeline_tag=pipeline_tag(model["class"]),
        model_name=title,
        eval_results=eval_results or None,
    )
    sp = report["sparsity"]
    resized = report.get("structured") is not None  # structured pruning: tensors physically smaller
    load_class = model["class"]
    if report.get("variable_layout"):  # per-layer widths: transformers' remote-code path of an Auto class
        from .structured.layout import _auto_classes

        load_class = _auto_classes(model.get("model_type") or "", model["class"])[0]
    return ModelCard.from_template(
        card_data,
        template_path=template_path(),
        title=title,
        base_model=base,
        model_class=model["class"],
        method_name=method_name,
        pattern=pattern,
        target_sparsity=config.get("sparsity"),
        config=config,
        config_json=json.dumps(config, indent=2, sort_keys=True),
        calibration=report.get("calibration") or {},
        overall=sp["overall"],
        per_kind=sorted(sp["per_module_kind"].items()),
        totals=report["model_totals"],
        run=report["run"],
        environment=report["environment"],
        versions=[(k, v) for k, v in report["environment"].items() if k in ("hf_prune", "torch", "transformers", "python")],
        load_path=repo_id or "path/to/this/folder",
        evaluations=evaluations,
        structured=report.get("structured_note"),
        resized=resized,
        load_class=load_class,
        trust_remote_code=bool(report.get("variable_layout")),
    )
