"""Model cards for every artifact hf_prune writes, rendered from the Jinja templates in ``model_cards/`` through
``huggingface_hub.ModelCard``: ``build_model_card`` for a pruned model (from its pruning report), ``render_card``
for an artifact with its own template, ``card_data`` for the metadata every card shares, ``CardSection`` for
sections an artifact adds."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable

from ..allocation import PLOT_NAME as ALLOCATION_PLOT
from ..models import family_for_type
from ..models.discovery import auto_pipeline_tag
from ..registry import DEFAULT_CARD, card_template, display_name
from ..structured.layout import auto_classes
from .plots import PLOT_EXTRA_HINT, SPARSITY_PICTURE, plot_layer_sparsity, removal_view

TEMPLATE = DEFAULT_CARD
CARD_NAME = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

# by transformers' class naming; a family's classes that these would get wrong are in its Family.pipeline_tags
_PIPELINES = (
    ("ForCausalLM", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForImageClassification", "image-classification"),
    ("Model", "feature-extraction"),
)

# the framework versions every card lists, in this order, when they are known
_VERSION_KEYS = ("hf_prune", "torch", "transformers", "accelerate", "peft", "datasets", "huggingface_hub", "python")
# the tags every card starts with
_LEAD_TAGS = ("hf_prune", "pruned")


def template_path(name: str = TEMPLATE) -> str:
    """A template of ``model_cards/`` by file name, or a template file of its own given by absolute path (a method
    registered from outside hf_prune brings its card that way)."""
    if os.path.isabs(name):
        return name
    # a source checkout (PYTHONPATH or a worktree): the templates next to this very package, not those of whatever
    # copy of hf_prune is installed in the environment
    checkout = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "model_cards", name)
    if os.path.isfile(checkout) and os.path.isfile(os.path.join(os.path.dirname(checkout), "__init__.py")):
        return os.path.normpath(checkout)
    return str(resources.files("hf_prune.model_cards").joinpath(name))


def hub_base_model(name_or_path: str | None) -> str | None:
    """The Hub id of the base model, or None for local paths (``base_model`` must be a Hub id)."""
    if not name_or_path or os.path.exists(name_or_path) or not _HUB_ID.match(name_or_path):
        return None
    return name_or_path


def pipeline_tag(model_class: str, model_type: str | None = None) -> str | None:
    """The Hub pipeline tag of a model class: its family's own tag for it (``model_type`` names the family), else
    the one its class-name suffix implies, else None."""
    family = family_for_type(model_type)
    if family is None and auto_pipeline_tag(model_class):  # a model found by generic discovery
        return auto_pipeline_tag(model_class)
    for suffix, tag in (*(family.pipeline_tags.items() if family is not None else ()), *_PIPELINES):
        if model_class.endswith(suffix):
            return tag
    return None


def pattern_tag(pattern: str) -> str:
    return "unstructured-sparsity" if pattern == "unstructured" else f"sparsity-{pattern.replace(':', 'of')}"


def framework_versions(environment: dict) -> list[tuple[str, str]]:
    """The ``(framework, version)`` pairs a card lists under "Framework versions", in one order for every card:
    those of ``_VERSION_KEYS`` that ``environment`` (a report's, or ``engine.report.environment()``) knows."""
    return [(k, environment[k]) for k in _VERSION_KEYS if environment.get(k)]


def card_data(base_model: str | None, model_name: str, tags: Iterable[str], *, pipeline: str | None = None,
              eval_results: list | None = None, library_name: str = "hf_prune"):
    """The ``huggingface_hub.ModelCardData`` every hf_prune card starts from, so that they stay alike on the Hub:
    ``base_model`` (a Hub id from ``hub_base_model``, or None), ``library_name`` (``"transformers"`` for a model
    stock transformers loads, so the Hub shows its "use this model" snippet; ``"hf_prune"``, the default, for
    artifacts only hf_prune reads: solution paths, IC pools), ``tags`` after the
    ones every card has ("hf_prune", "pruned"), the ``pipeline`` tag where the artifact has one, the title as
    ``model_name`` and the ``model-index`` entries (``eval_results``) when there are any."""
    from huggingface_hub import ModelCardData

    return ModelCardData(base_model=base_model, library_name=library_name,
                         tags=[*_LEAD_TAGS, *(t for t in tags if t not in _LEAD_TAGS)], pipeline_tag=pipeline,
                         model_name=model_name, eval_results=eval_results or None)


# ------------------------------------------------------------------------------------------------- card parts


@dataclass(frozen=True)
class CardSection:
    """A section an artifact adds to a card: a ``## title`` followed by ``body`` (Markdown)."""
    title: str
    body: str

    @classmethod
    def coerce(cls, value: Any) -> "CardSection":
        if isinstance(value, CardSection):
            return value
        if isinstance(value, dict) and set(value) == {"title", "body"}:
            value = (value["title"], value["body"])
        if (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, str) for v in value)
                and value[0].strip()):
            return cls(value[0].strip(), value[1])
        raise TypeError(f"a card section must be a CardSection(title, body) or a (title, markdown) pair of "
                        f"strings, got {value!r}.")

    def to_dict(self) -> dict:
        return {"title": self.title, "body": self.body}


def check_sections(sections: Iterable[Any] | None) -> list[CardSection]:
    return [CardSection.coerce(s) for s in sections or ()]


def check_evaluations(evaluations: Iterable[dict] | None) -> list[dict]:
    """Validate evaluation records: dicts with ``metric`` (str) and ``value`` (number), optionally
    ``dense`` (the dense model's value), ``dataset``, ``split``, ``seq_len``, ``windows``, ``task`` and
    ``protocol`` (a dict of how it was measured). ``hf_prune.evaluation.perplexity_record`` makes one."""
    out = []
    for i, record in enumerate(evaluations or ()):
        if not isinstance(record, dict):
            raise TypeError(f"evaluations[{i}] must be a dict such as hf_prune.evaluation.perplexity_record(...) "
                            f"returns, got {type(record).__name__}.")
        if not isinstance(record.get("metric"), str) or not record["metric"]:
            raise ValueError(f"evaluations[{i}] needs a 'metric' name (e.g. 'perplexity'), got {record!r}.")
        for key in ("value", "dense"):
            value = record.get(key)
            if (key == "value" or value is not None) and (isinstance(value, bool)
                                                          or not isinstance(value, (int, float))):
                raise ValueError(f"evaluations[{i}][{key!r}] must be a number, got {value!r}.")
        if record.get("protocol") is not None and not isinstance(record["protocol"], dict):
            raise ValueError(f"evaluations[{i}]['protocol'] must be a dict describing how it was measured.")
        out.append(dict(record))
    return out


def _eval_results(evaluations: list[dict], default_task: str | None) -> list:
    """``model-index`` entries (``EvalResult``) for the evaluations that name their dataset (in-memory data,
    recorded as ``<in-memory ...>``, stays in the card's body only). A local file or task is named by its file or
    task name (never by the machine's path) and has no Hub split."""
    from huggingface_hub import EvalResult

    results = []
    for e in evaluations:
        if not e.get("dataset") or str(e["dataset"]).startswith("<"):
            continue
        args = {k: e[k] for k in ("seq_len", "windows", "n", "num_fewshot") if e.get(k) is not None}
        if e.get("protocol") and e["protocol"].get("num_fewshot") is not None:
            args["num_fewshot"] = e["protocol"]["num_fewshot"]
        dataset = public_source(str(e["dataset"]))
        results.append(EvalResult(task_type=e.get("task") or default_task or "text-generation",
                                  dataset_type=dataset, dataset_name=e.get("lm_eval_task") or dataset,
                                  dataset_config=e.get("dataset_config"),
                                  dataset_split=None if e.get("local") else e.get("split"), metric_type=e["metric"],
                                  metric_value=e["value"], dataset_args=args or None))
    return results


def public_source(source: Any) -> Any:
    """A data source as a card may publish it: an absolute local path (written by an older hf_prune, or given by
    the user) shrinks to its file name; anything else is kept."""
    if isinstance(source, str) and os.path.isabs(source):
        return os.path.basename(source.rstrip(os.sep)) or source
    return source


_ABS_PATH = re.compile(r"(?<![\w.:/~-])(?:/[^\s/`'\"]+)+/([^\s/`'\"]+)")


def scrub_paths(value: Any) -> Any:
    """``value`` (a string, or a dict/list of them) with every absolute local path replaced by its last component:
    what a card publishes names files, never the machine's folders."""
    if isinstance(value, str):
        return _ABS_PATH.sub(r"\1", value)
    if isinstance(value, dict):
        return {k: scrub_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_paths(v) for v in value)
    return value


def structure_rows(view: dict) -> list[dict]:
    """Per block of a structurally pruned model (``plots.removal_view`` of its report): the Linear shapes that
    changed (before -> after), the weights before and after, the share removed and the Linear FLOPs per token
    removed (2 per weight: one multiply, one add)."""
    per_block = view["sparsity"].get("per_block") or {}
    blocks = sorted(per_block, key=len, reverse=True)
    rows: dict[str, dict] = {}
    for name, e in view["sparsity"]["per_module"].items():
        block = next((b for b in blocks if name.startswith(b + ".")), "")
        row = rows.setdefault(block, {"block": block or "-", "changes": [], "before": 0, "after": 0})
        row["before"] += e["weights_before"]
        row["after"] += e["weights_after"]
        if list(e["original_shape"]) != list(e["shape"]):
            short = name[len(block) + 1:] if block else name
            row["changes"].append(f"`{short}` {'×'.join(map(str, e['original_shape']))} → "
                                  f"{'×'.join(map(str, e['shape']))}")
    from .plots import _natural

    out = []
    for block in sorted(rows, key=_natural):
        row = rows[block]
        removed = row["before"] - row["after"]
        out.append({**row, "removed": removed, "fraction": removed / max(1, row["before"]),
                    "flops_removed": 2 * removed})
    return out


def solution_path_info(report: dict, config: dict) -> dict | None:
    """For a model read off a solution path: where the path came from (file name or Hub id, never a local path)
    and what its search did (formatted), so the card can point at it."""
    path = report.get("solution_path")
    if not path:
        return None
    search = path.get("search") or {}
    items = []
    for key, value in sorted(search.items()):
        if isinstance(value, bool) or isinstance(value, (dict, list)):
            continue
        items.append((key, f"{value:.4g}" if isinstance(value, float) else str(value)))
    source = config.get("path")
    return {"source": scrub_paths(source) if source else None, "kind": path.get("kind"), "units": path.get("units"),
            "search": items, "training_free": search.get("kind") == "training_free"}


def render_card(card_data: Any, template: str = TEMPLATE, **variables: Any):
    """A ``huggingface_hub.ModelCard`` from one of the templates in ``model_cards/``."""
    from huggingface_hub import ModelCard

    return ModelCard.from_template(card_data, template_path=template_path(template), **variables)


def build_model_card(report: dict, *, repo_id: str | None = None, evaluations: list[dict] | None = None,
                     finetuning: dict | None = None, sections: Iterable[Any] | None = None,
                     picture: str | None = None, extra_tags: Iterable[str] = (), allocation_plot: str | None = None):
    """A ``huggingface_hub.ModelCard`` for a pruned model, from its pruning report.

    ``evaluations``: dense-vs-pruned measurements (see ``check_evaluations``), shown with their protocol and
    written to the ``model-index``; ``finetuning``: the summary of a recovery fine-tuning run
    (``SparsityPreservingCallback.summary()``); ``sections``: extra ``CardSection``s an artifact adds;
    ``picture``: the file name (in the same folder) of the per-layer sparsity PNG, or None when it was not drawn;
    ``allocation_plot``: the file name of an allocating method's (ECoFLaP's) per-module allocation PNG.
    """

    evaluations = check_evaluations(evaluations)
    sections = check_sections(sections)
    config = report["config"]
    method = report["method"]
    model = report["model"]
    base = hub_base_model(model.get("name_or_path"))
    method_name = display_name(method)
    pattern = report.get("pattern") or config.get("pattern") or "unstructured"
    title = f"{base.split('/')[-1] if base else model['class']} pruned with {method_name} ({pattern})"
    task = pipeline_tag(model["class"], model.get("model_type"))
    tags = [method, pattern_tag(pattern)]
    if finetuning:
        tags.append("recovery-finetuned")
    tags += [t for t in extra_tags if t not in tags]
    # a pruned model loads with stock transformers (a per-layer layout through its remote-code auto_map)
    metadata = card_data(base, title, tags, pipeline=task, eval_results=_eval_results(evaluations, task),
                         library_name="transformers")
    resized = report.get("structured") is not None or report.get("pattern") == "structured"  # tensors physically smaller
    view = removal_view(report)  # structured: what was removed from the original weights, not zeros left
    sp = view["sparsity"]
    environment = report.get("environment") or {}
    calibration = scrub_paths(report.get("calibration") or {})  # provenance names files, never local folders
    load_class = model["class"]
    if report.get("variable_layout"):  # per-layer widths: transformers' remote-code path of an Auto class
        load_class = auto_classes(model.get("model_type") or "", model["class"])[0]
    return render_card(
        metadata,
        card_template(method),
        title=title,
        base_model=base,
        model_class=model["class"],
        method_name=method_name,
        pattern=pattern,
        target_sparsity=config.get("sparsity"),
        config=config,
        config_json=json.dumps(scrub_paths(config), indent=2, sort_keys=True),
        calibration=calibration,
        calibration_items=sorted((k, v) for k, v in calibration.items() if not isinstance(v, (dict, list))),
        overall=sp["overall"],
        per_kind=sorted(sp["per_module_kind"].items()),
        blocks=len(sp.get("per_block") or {}),
        totals=report["model_totals"],
        run=report["run"],
        environment=environment,
        versions=framework_versions(environment),
        load_path=repo_id or "path/to/this/folder",
        evaluations=evaluations,
        finetuning=finetuning,
        sections=sections,
        picture=picture,
        plot_hint=PLOT_EXTRA_HINT,
        previous_runs=[(r.get("method"), r.get("pattern")) for r in report.get("previous_runs") or []],
        changed=report.get("weights_changed_since_pruning"),
        structured=report.get("structured_note"),
        allocation=report.get("allocation"),
        allocation_rows=_allocation_rows(report.get("allocation")),
        allocation_plot=allocation_plot,
        layer_pruner=display_name((report.get("layer_pruner") or {}).get("method")),
        resized=resized,
        structure=structure_rows(view) if resized else [],
        parameters=(report.get("structured") or {}).get("parameters") or report.get("parameters"),
        linear_flops=(report.get("structured") or {}).get("linear_flops_per_token"),
        read_off=report.get("read_off"),
        path_info=solution_path_info(report, config),
        load_class=load_class,
        trust_remote_code=bool(report.get("variable_layout")),
    )


def _allocation_rows(allocation: dict | None) -> list[dict]:
    """One row per budget of a sparsity allocation: size, target, allocated, least and most sparse group."""
    rows = []
    for name, budget in ((allocation or {}).get("budgets") or {}).items():
        group_sparsity = [allocation["groups"][g]["sparsity"] for g in budget["groups"]]
        rows.append({"name": name, "size": budget["size"], "target": budget["target"],
                     "allocated": budget["allocated"], "low": min(group_sparsity), "high": max(group_sparsity)})
    return rows


def card_files_for_folder(folder: str | os.PathLike, repo_id: str | None = None) -> dict[str, bytes]:
    """The card of a folder written by ``Pruner.save_pretrained``, re-rendered from its ``pruning_report.json``
    for ``repo_id`` (``{"README.md": ...}``, plus the per-layer picture when the folder lacks it and matplotlib
    is now installed); empty for a folder without a report."""

    path = os.path.join(folder, "pruning_report.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        report = json.load(fh)
    files: dict[str, bytes] = {}
    has_picture = os.path.isfile(os.path.join(folder, SPARSITY_PICTURE))
    if not has_picture:
        with tempfile.TemporaryDirectory(prefix="hf_prune-card-") as tmp:
            drawn = plot_layer_sparsity(report, os.path.join(tmp, SPARSITY_PICTURE))
            if drawn:
                with open(drawn, "rb") as fh:
                    files[SPARSITY_PICTURE] = fh.read()
                has_picture = True

    card = report.get("card") or {}
    allocation_plot = ALLOCATION_PLOT if os.path.isfile(os.path.join(folder, ALLOCATION_PLOT)) else None
    files[CARD_NAME] = build_model_card(report, repo_id=repo_id, evaluations=card.get("evaluations"),
                                        finetuning=card.get("finetuning"), sections=card.get("sections"),
                                        picture=SPARSITY_PICTURE if has_picture else None,
                                        allocation_plot=allocation_plot).content.encode("utf-8")
    return files
