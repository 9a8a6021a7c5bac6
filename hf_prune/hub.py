"""Model cards and pushing to the Hugging Face Hub, shared by every artifact hf_prune writes.

Cards are rendered from the Jinja templates in ``model_cards/`` through ``huggingface_hub.ModelCard``
(``build_model_card`` for a pruned model; ``render_card`` for an artifact with its own template; artifacts
add their own sections with ``CardSection``).

Pushing never goes through ``transformers``' ``PushToHubMixin`` (it replaces the README that
``save_pretrained`` wrote with its default card). Instead an artifact's ``push_to_hub`` is one line::

    def push_to_hub(self, repo_id, **kwargs):
        return push_pretrained(lambda folder: self.save_pretrained(folder, repo_id=repo_id), repo_id, **kwargs)

``push_pretrained`` creates the repo first (so a missing network or token fails before anything is written),
saves into a temporary folder and commits that folder, card included, in one commit. ``push_folder`` pushes
a folder that is already on disk (``hf-prune push DIR REPO``). Hub failures become one-line ``HubError``s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterable

from .errors import HubError

TEMPLATE = "pruned_model.md.j2"
CARD_NAME = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

METHOD_NAMES = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "ria": "RIA", "ecoflap": "ECoFLaP",
                "spp": "SPP", "modhifi": "ModHiFi"}

_PIPELINES = (
    ("ForCausalLM", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForImageClassification", "image-classification"),
    ("Blip2ForConditionalGeneration", "image-to-text"),
    ("CLIPModel", "zero-shot-image-classification"),
    ("Model", "feature-extraction"),
)

# the framework versions a card lists, in this order, when the report recorded them
_VERSION_KEYS = ("hf_prune", "torch", "transformers", "accelerate", "peft", "datasets", "huggingface_hub", "python")


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
    recorded as ``<in-memory ...>``, stays in the card's body only)."""
    from huggingface_hub import EvalResult

    results = []
    for e in evaluations:
        if not e.get("dataset") or str(e["dataset"]).startswith("<"):
            continue
        args = {k: e[k] for k in ("seq_len", "windows") if e.get(k) is not None}
        results.append(EvalResult(task_type=e.get("task") or default_task or "text-generation",
                                  dataset_type=str(e["dataset"]), dataset_name=str(e["dataset"]),
                                  dataset_split=e.get("split"), metric_type=e["metric"], metric_value=e["value"],
                                  dataset_args=args or None))
    return results


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
    from huggingface_hub import ModelCardData

    from .plots import PLOT_EXTRA_HINT

    evaluations = check_evaluations(evaluations)
    sections = check_sections(sections)
    config = report["config"]
    method = report["method"]
    model = report["model"]
    base = hub_base_model(model.get("name_or_path"))
    method_name = METHOD_NAMES.get(method, method)
    pattern = report.get("pattern") or config.get("pattern") or "unstructured"
    title = f"{base.split('/')[-1] if base else model['class']} pruned with {method_name} ({pattern})"
    task = pipeline_tag(model["class"])
    tags = ["hf_prune", "pruned", method, pattern_tag(pattern)]
    if finetuning:
        tags.append("recovery-finetuned")
    tags += [t for t in extra_tags if t not in tags]
    eval_results = _eval_results(evaluations, task)
    card_data = ModelCardData(
        base_model=base,
        library_name="hf_prune",
        tags=tags,
        pipeline_tag=task,
        model_name=title,
        eval_results=eval_results or None,
    )
    sp = report["sparsity"]
    environment = report.get("environment") or {}
    calibration = report.get("calibration") or {}
    resized = report.get("structured") is not None or report.get("pattern") == "structured"  # tensors physically smaller
    load_class = model["class"]
    if report.get("variable_layout"):  # per-layer widths: transformers' remote-code path of an Auto class
        from .structured.layout import _auto_classes

        load_class = _auto_classes(model.get("model_type") or "", model["class"])[0]
    return render_card(
        card_data,
        title=title,
        base_model=base,
        model_class=model["class"],
        method_name=method_name,
        pattern=pattern,
        target_sparsity=config.get("sparsity"),
        config=config,
        config_json=json.dumps(config, indent=2, sort_keys=True),
        calibration=calibration,
        calibration_items=sorted((k, v) for k, v in calibration.items() if not isinstance(v, (dict, list))),
        overall=sp["overall"],
        per_kind=sorted(sp["per_module_kind"].items()),
        blocks=len(sp.get("per_block") or {}),
        totals=report["model_totals"],
        run=report["run"],
        environment=environment,
        versions=[(k, environment[k]) for k in _VERSION_KEYS if environment.get(k)],
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
        layer_pruner=METHOD_NAMES.get((report.get("layer_pruner") or {}).get("method"),
                                      (report.get("layer_pruner") or {}).get("method")),
        resized=resized,
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
    from .plots import SPARSITY_PICTURE, plot_layer_sparsity

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
    from .allocation import PLOT_NAME as ALLOCATION_PLOT

    card = report.get("card") or {}
    allocation_plot = ALLOCATION_PLOT if os.path.isfile(os.path.join(folder, ALLOCATION_PLOT)) else None
    files[CARD_NAME] = build_model_card(report, repo_id=repo_id, evaluations=card.get("evaluations"),
                                        finetuning=card.get("finetuning"), sections=card.get("sections"),
                                        picture=SPARSITY_PICTURE if has_picture else None,
                                        allocation_plot=allocation_plot).content.encode("utf-8")
    return files


# ------------------------------------------------------------------------------------------------- pushing


def check_repo_id(repo_id: Any) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be a string such as 'your-name/model-name', got {type(repo_id).__name__}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"repo_id={repo_id!r} is not a valid Hub repository id ({exc}); use "
                         "'your-name/model-name' with letters, digits, '-', '_' and '.'.") from None
    return repo_id


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _fix_hint(endpoint: str) -> str:
    return (f"check the network (or set HF_ENDPOINT to a Hub you can reach; now {endpoint}); to work offline, "
            "save with save_pretrained(folder) and push later with `hf-prune push FOLDER REPO`")


@contextlib.contextmanager
def hub_errors(action: str, repo_id: str):
    """Turn what ``huggingface_hub``/its HTTP client raise into a one-line ``HubError`` naming the endpoint."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    endpoint = _endpoint()
    try:
        yield
    except OfflineModeIsEnabled:
        raise HubError(f"cannot {action} {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach "
                       f"{endpoint}, or save with save_pretrained(folder) and push later with "
                       "`hf-prune push FOLDER REPO`.") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        server = (exc.server_message or str(exc)).strip().splitlines()[0] if (exc.server_message or str(exc)) else ""
        if status in (401, 403):
            raise HubError(f"the Hub at {endpoint} refused to {action} {repo_id!r} (HTTP {status}: {server}); "
                           "pass token=... (a token with write access, or run `hf auth login`) and check that you "
                           "may write to that namespace.") from None
        raise HubError(f"the Hub at {endpoint} answered HTTP {status} when asked to {action} {repo_id!r}: "
                       f"{server}") from None
    except httpx2.TransportError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"cannot reach the Hugging Face Hub at {endpoint} to {action} {repo_id!r} "
                       f"({type(exc).__name__}: {reason}); {_fix_hint(endpoint)}.") from None
    except ValueError as exc:  # huggingface_hub's metadata validation ("Invalid metadata in README.md")
        if "metadata" not in str(exc):
            raise
        detail = " ".join(line.strip("- ") for line in str(exc).splitlines()[1:3])
        raise HubError(f"the Hub at {endpoint} rejected the model card's metadata when asked to {action} "
                       f"{repo_id!r}: {detail or exc}") from None


def _api(token: str | bool | None):
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        from huggingface_hub.errors import OfflineModeIsEnabled

        raise OfflineModeIsEnabled("offline")
    return HfApi(endpoint=_endpoint(), token=token)


def _open_repo(repo_id: str, *, private: bool | None, token: str | bool | None, revision: str | None,
               create_pr: bool):
    """Create the repo (and the ``revision`` branch) if needed; returns the ``HfApi`` to commit with."""
    with hub_errors("create the repo", repo_id):
        api = _api(token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api


def folder_files(folder: str | os.PathLike) -> dict[str, str]:
    """``{path in repo: local path}`` of every file under ``folder``, skipping hidden files and folders
    (``.git``, ``.cache``, partial writes)."""
    folder = os.fspath(folder)
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            local = os.path.join(root, name)
            out[os.path.relpath(local, folder).replace(os.sep, "/")] = local
    return out


def _commit(api, repo_id: str, folder: str, *, files: dict[str, bytes | str] | None, revision: str | None,
            create_pr: bool, commit_message: str, commit_description: str | None, path_in_repo: str | None):
    from huggingface_hub import CommitOperationAdd

    sources: dict[str, Any] = dict(folder_files(folder))
    for path, content in (files or {}).items():
        sources[path] = content.encode("utf-8") if isinstance(content, str) else content
    if not sources:
        raise ValueError(f"nothing to push: {folder!r} holds no files.")
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo and path_in_repo.strip("/") else ""
    operations = [CommitOperationAdd(path_in_repo=prefix + path, path_or_fileobj=src)
                  for path, src in sorted(sources.items())]
    with hub_errors("upload to", repo_id):
        return api.create_commit(repo_id, operations, commit_message=commit_message,
                                 commit_description=commit_description, revision=revision,
                                 create_pr=create_pr, repo_type="model")


def _check_push_args(repo_id: Any, private: Any, create_pr: Any, revision: Any, commit_message: Any,
                     path_in_repo: Any = None) -> None:
    check_repo_id(repo_id)
    if path_in_repo is not None and (not isinstance(path_in_repo, str) or ".." in path_in_repo.split("/")):
        raise ValueError(f"path_in_repo must be a folder path inside the repo such as 'paths/run1', got "
                         f"{path_in_repo!r}.")
    if private is not None and not isinstance(private, bool):
        raise TypeError(f"private must be True, False or None (the namespace's default), got {private!r}.")
    if not isinstance(create_pr, bool):
        raise TypeError(f"create_pr must be True or False, got {create_pr!r}.")
    for name, value in (("revision", revision), ("commit_message", commit_message)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{name} must be a non-empty string or None, got {value!r}.")


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                commit_message: str | None = None, commit_description: str | None = None,
                files: dict[str, bytes | str] | None = None, path_in_repo: str | None = None):
    """Push every file of ``folder`` to the model repo ``repo_id`` in one commit (creating the repo and the
    ``revision`` branch if needed); ``files`` adds or replaces files (``{path in folder: bytes or str}``), e.g. a
    re-rendered ``README.md``; ``path_in_repo`` puts everything under that folder of the repo.
    Returns ``huggingface_hub.CommitInfo`` (``.commit_url``, ``.pr_url``)."""
    _check_push_args(repo_id, private, create_pr, revision, commit_message, path_in_repo)
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot push {folder!r}: it is not a folder.")
    api = _open_repo(repo_id, private=private, token=token, revision=revision, create_pr=create_pr)
    return _commit(api, repo_id, folder, files=files, revision=revision, create_pr=create_pr,
                   commit_message=commit_message or f"Upload {os.path.basename(os.path.abspath(folder))} with hf_prune",
                   commit_description=commit_description, path_in_repo=path_in_repo)


def push_pretrained(save: Callable[[str], Any], repo_id: str, *, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    commit_message: str | None = None, commit_description: str | None = None,
                    path_in_repo: str | None = None):
    """Create the repo, then ``save(folder)`` into a temporary folder and commit it (card included) to
    ``repo_id`` (under ``path_in_repo`` if given). This is what every artifact's ``push_to_hub`` calls.
    Returns ``huggingface_hub.CommitInfo``."""
    _check_push_args(repo_id, private, create_pr, revision, commit_message, path_in_repo)
    api = _open_repo(repo_id, private=private, token=token, revision=revision, create_pr=create_pr)
    with tempfile.TemporaryDirectory(prefix="hf_prune-push-") as tmp:
        folder = os.path.join(tmp, repo_id.split("/")[-1])
        save(folder)
        return _commit(api, repo_id, folder, files=None, revision=revision, create_pr=create_pr,
                       commit_message=commit_message or "Upload with hf_prune", commit_description=commit_description,
                       path_in_repo=path_in_repo)
