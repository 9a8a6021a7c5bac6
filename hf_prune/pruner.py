"""``Pruner``: load a model, prune it with any registered method, save it for stock ``from_pretrained``."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import torch
from torch import nn

from .allocation import Allocation
from .artifacts.cards import CARD_NAME, build_model_card, check_evaluations, check_sections
from .artifacts.hub import push_pretrained
from .artifacts.plots import SPARSITY_PICTURE, plot_layer_sparsity
from .artifacts.save import check_model_output, save_model_folder
from .calibration.data import is_prepared
from .checks import looks_like_path
from .config import PrunerConfig
from .engine import distributed
from .engine.checkpoint import RunCheckpoint, resumable_methods
from .engine.offload import module_weight
from .errors import CheckpointError, HFPruneError, ModelLoadError, UnsupportedModelError
from .models import text_context
from .registry import get_method
from .result import PruningResult

REPORT_NAME = "pruning_report.json"


def _split_processing(tokenizer: Any, processor: Any) -> tuple[Any, Any]:
    """Accept a multimodal processor passed as ``tokenizer`` and expose its tokenizer."""
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

    if isinstance(tokenizer, ProcessorMixin) and processor is None:
        processor, tokenizer = tokenizer, None
    if tokenizer is None and isinstance(processor, ProcessorMixin):
        tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase) and not callable(tokenizer):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    return tokenizer, processor


# files that make a tokenizer / a processor (image, video, audio or multimodal) when a checkpoint ships one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt", "sentencepiece.bpe.model", "special_tokens_map.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "feature_extractor_config.json")


def _listed_files(name_or_path: str, **hub_kwargs: Any) -> list[str] | None:
    """The file names of a checkpoint (a local folder, or a Hub repo at ``revision`` with ``token``), or None
    when they cannot be listed (offline with a cached copy): then only loading can tell."""
    subfolder = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(name_or_path):
        folder = os.path.join(name_or_path, subfolder)
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if hub_kwargs.get("local_files_only"):
        return None
    try:
        from huggingface_hub import HfApi, constants

        if constants.is_offline_mode():
            return None
        files = HfApi(endpoint=constants.ENDPOINT).list_repo_files(name_or_path, revision=hub_kwargs.get("revision"),
                                                                   token=hub_kwargs.get("token"))
    except Exception:  # the repo cannot be listed (no network, no such endpoint): the loaders decide alone
        return None
    prefix = subfolder.strip("/") + "/" if subfolder else ""
    return sorted(f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):])


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def load_processing(name_or_path: str, **hub_kwargs: Any) -> tuple[Any, Any]:
    """(tokenizer, processor) for a checkpoint; ``hub_kwargs``: ``revision``, ``token``, ``subfolder``,
    ``cache_dir``, ``local_files_only``.

    A checkpoint that ships tokenizer or processor files which then fail to load is a ``ModelLoadError`` naming the
    files and the loader's reason (never a model silently without its tokenizer); one that ships none gets a
    warning (some models need none: pass batches of model inputs, or ``Pruner(model, tokenizer=...)``)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase, ProcessorMixin

    files = _listed_files(name_or_path, **hub_kwargs)
    tokenizer_files = [f for f in files or () if f in TOKENIZER_FILES]
    processor_files = [f for f in files or () if f in PROCESSOR_FILES]
    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    if files is not None and not tokenizer_files and not processor_files:
        warnings.warn(f"{name_or_path!r} ships no tokenizer or processor (none of {', '.join(TOKENIZER_FILES[:3])}, "
                      f"{', '.join(PROCESSOR_FILES[:2])}, ...): the model is loaded without one. Text calibration "
                      "and evaluation need one: pass Pruner(model, tokenizer=...) or calibration batches of model "
                      "inputs.", stacklevel=3)
        return None, None
    errors: dict[str, str] = {}
    tokenizer = processor = None
    for loader in (AutoProcessor, AutoTokenizer, AutoImageProcessor):
        try:
            loaded = loader.from_pretrained(name_or_path, **kwargs)
        except Exception as exc:  # each loader raises its own errors for checkpoints without that component
            errors[loader.__name__] = _reason(exc)
            continue
        if isinstance(loaded, PreTrainedTokenizerBase):
            tokenizer = tokenizer or loaded
        elif isinstance(loaded, ProcessorMixin):
            processor, tokenizer = loaded, getattr(loaded, "tokenizer", None) or tokenizer
        else:
            processor = processor or loaded  # an image processor
        if (tokenizer is not None or not tokenizer_files) and (processor is not None or not processor_files):
            break
    missing = [(what, shipped, loader) for what, shipped, got, loader in (
        ("tokenizer", tokenizer_files, tokenizer, "AutoTokenizer"),
        ("processor", processor_files, processor, "AutoProcessor")) if shipped and got is None]
    if missing:
        what, shipped, loader = missing[0]
        reason = errors.get(loader) or next(iter(errors.values()), "it loaded as something else")
        raise ModelLoadError(f"{name_or_path!r} ships a {what} ({', '.join(shipped)}) that fails to load ({reason}); "
                             f"fix or re-download those files (force_download=True), or load the model yourself and "
                             f"pass Pruner(model, tokenizer=...).")
    if tokenizer is None and processor is None:
        warnings.warn(f"no tokenizer or processor loaded for {name_or_path!r} ({'; '.join(errors.values())}); pass "
                      "calibration batches of model inputs or create Pruner(model, tokenizer=...).", stacklevel=3)
    return tokenizer, processor


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_model_folder(folder: str) -> None:
    """A local model folder that can load: it has ``config.json``, safetensors weights (hf_prune never unpickles a
    ``pytorch_model.bin``: unpickling can run code) and no truncated or corrupt ``.safetensors`` file."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ModelLoadError(f"{folder} has no config.json; give the folder a model was saved to with "
                             "save_pretrained, or a Hub id such as owner/name.")
    files = sorted(os.listdir(folder))
    weights = [f for f in files if f.endswith(".safetensors")]
    pickles = [f for f in files if f.endswith(PICKLE_WEIGHTS)]
    if not weights and pickles:
        raise ModelLoadError(f"{folder} holds its weights only as a pickle ({pickles[0]}), which hf_prune never "
                             "loads (unpickling can run code); convert it to model.safetensors with a tool you "
                             "trust, or use a copy of the model saved in safetensors.")
    for name in weights:
        try:
            with safe_open(os.path.join(folder, name), framework="pt"):
                pass
        except SafetensorError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{os.path.join(folder, name)} is truncated or corrupt ({reason}); download or "
                                 "save the model again.") from None


def _check_hub_model(repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
                     cache_dir: str | None = None, local_files_only: bool = False) -> None:
    """A Hub id that can load: its ``config.json`` is in the cache, or one request (no retries) finds it on the
    Hub. Anything else is one ``ModelLoadError`` line instead of a minute of retry warnings and a traceback."""
    import httpx2
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision), str):
        return
    where = f"{repo_id!r} is not a local folder (no such folder) nor in the Hub cache"
    if local_files_only or constants.is_offline_mode():
        raise ModelLoadError(f"{where}, and offline mode is on (HF_HUB_OFFLINE=1 or local_files_only); give a local "
                             "model folder, or go online to download it.")
    endpoint = constants.ENDPOINT
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=revision), token=token)
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{where}, and the Hub at {endpoint} has no model {repo_id!r} (or it is private or "
                             "gated: pass a token, e.g. `hf auth login`); check the id or the path.") from None
    except EntryNotFoundError:
        raise ModelLoadError(f"the Hub repo {repo_id!r} has no config.json at revision {revision or 'main'}; it is "
                             "not a transformers model.") from None
    except (HfHubHTTPError, httpx2.TransportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{where}, and the Hub at {endpoint} cannot be reached ({type(exc).__name__}: "
                             f"{reason}); check the network or HF_ENDPOINT, or give a local model folder.") from None


def check_model_source(name_or_path: str, **hub_kwargs: Any) -> None:
    """Refuse, in one line that names the fix, a model that cannot load, before transformers tries: a local path
    that does not exist ("no such folder", never taken for a Hub id), a folder without ``config.json``, with only
    pickle weights or with a truncated or corrupt safetensors file, or a Hub id that is neither cached nor found.
    ``hub_kwargs``: ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``."""
    subfolder = hub_kwargs.pop("subfolder", None)
    if os.path.isdir(name_or_path):
        _check_model_folder(os.path.join(name_or_path, subfolder) if subfolder else name_or_path)
    elif os.path.exists(name_or_path):
        raise ModelLoadError(f"{name_or_path} is a file; give the folder the model was saved to (with config.json).")
    elif looks_like_path(name_or_path):
        raise ModelLoadError(f"no such folder: {name_or_path!r}; give the folder of a saved model (with "
                             "config.json) or a Hub id such as owner/name.")
    elif subfolder is None:
        _check_hub_model(name_or_path, **hub_kwargs)


def _model_class(config: Any) -> type:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _zeros_changed(model: nn.Module, report: dict) -> list[str]:
    """Pruned modules whose weight no longer has the number of zeros the report recorded (same shape only)."""
    modules = dict(model.named_modules())
    changed = []
    for name, entry in report["sparsity"]["per_module"].items():
        module = modules.get(name)
        weight = module_weight(module) if getattr(module, "weight", None) is not None else None
        if weight is not None and list(weight.shape) == list(entry["shape"]):
            # structured reports count removed weights in "zeros" and the stored tensor's zeros in "stored_zeros"
            if int((weight == 0).sum()) != entry.get("stored_zeros", entry["zeros"]):
                changed.append(name)
    return changed


class Pruner:
    """Prunes one Hugging Face model in place.

    >>> pruner = Pruner.from_pretrained("meta-llama/Llama-2-7b-hf", dtype="auto")
    >>> result = pruner.prune(WandaConfig(sparsity=0.5, pattern="2:4"), calibration_dataset=texts)
    >>> pruner.save_pretrained("out/")
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, processor: Any = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Pruner needs a transformers model (torch.nn.Module), got {type(model).__name__}.")
        self.model = model
        self.tokenizer, self.processor = _split_processing(tokenizer, processor)
        self.results: list[PruningResult] = []
        self.source: dict | None = None  # set by from_pretrained: the id / folder, revision and subfolder loaded

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: Any = "auto", device_map: Any = None,
                        model_class: type | None = None, trust_remote_code: bool = False,
                        **load_kwargs: Any) -> "Pruner":
        """Load the model (its own architecture class, e.g. ``LlamaForCausalLM``) and its tokenizer/processor.

        ``dtype`` defaults to the checkpoint's dtype; ``device_map``/``load_kwargs`` go to ``from_pretrained``.
        A model that cannot load (no such folder, pickle-only or corrupt weights, a Hub id neither cached nor found)
        is a ``ModelLoadError`` before transformers runs.
        """
        from safetensors import SafetensorError
        from transformers import AutoConfig

        name_or_path = os.fspath(name_or_path)
        hub_kwargs = {k: load_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only")
                      if k in load_kwargs}
        check_model_source(name_or_path, subfolder=load_kwargs.get("subfolder"), **hub_kwargs)
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                            **({"subfolder": load_kwargs["subfolder"]} if load_kwargs.get("subfolder")
                                               else {}), **hub_kwargs)
        cls_ = model_class or _model_class(config)
        load_kwargs.setdefault("use_safetensors", True)  # never unpickle a checkpoint: unpickling can run code
        # the tokenizer/processor first: one that the checkpoint ships but that fails to load is an error before
        # the weights are read
        tokenizer, processor = load_processing(name_or_path, subfolder=load_kwargs.get("subfolder"),
                                               trust_remote_code=trust_remote_code or None, **hub_kwargs)
        try:
            model = cls_.from_pretrained(name_or_path, dtype=dtype, device_map=device_map,
                                         trust_remote_code=trust_remote_code, **load_kwargs)
        except SafetensorError as exc:  # a cached Hub file (local folders were checked above)
            raise ModelLoadError(f"a weights file of {name_or_path!r} is truncated or corrupt ({exc}); download it "
                                 "again (force_download=True).") from None
        pruner = cls(model, tokenizer, processor=processor)
        # where it came from, as the user named it: a Hub id (the card's base_model) at a revision
        pruner.source = {"name_or_path": name_or_path, "revision": hub_kwargs.get("revision"),
                         "subfolder": load_kwargs.get("subfolder")}
        return pruner

    # ------------------------------------------------------------------------------------------
    @property
    def last_result(self) -> PruningResult | None:
        return self.results[-1] if self.results else None

    def prune(self, config: PrunerConfig | dict, calibration_dataset: Any = None, *,
              device: str | torch.device | None = None, progress: bool = True,
              checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
              restart: bool = False) -> PruningResult:
        """Prune ``self.model`` in place with ``config``'s method.

        ``calibration_dataset`` overrides ``config.calibration.dataset``: a list of texts, a
        ``datasets.Dataset``, a local file, ``"builtin:python-docs"``, a Hub name, or model-input batches.
        ``device`` is where each block runs (default: the model's accelerator, else CUDA if present, else CPU).
        Everything is validated before any weight changes.

        ``checkpoint_dir``: save a checkpoint there after every block (see ``hf_prune.checkpoint``); with
        ``resume=True`` continue the run checkpointed there (load the same unpruned model and pass the same config
        and data: anything else is refused before a weight changes) and end with weights bit-identical to an
        uninterrupted run. A folder that already holds a checkpoint is refused without ``resume=True``;
        ``restart=True`` deletes that checkpoint and starts afresh. While the run goes, a lock in the folder
        (pid, start time, command line) refuses every other run there; it is released when ``prune`` returns or
        raises (a ``KeyboardInterrupt`` too, which passes unchanged). A run that fails before its first block is
        done leaves no checkpoint. Resumable methods: ``hf_prune.engine.checkpoint.resumable_methods()`` (the
        layer-wise pruners and ECoFLaP). The folder is left in place afterwards (delete it once the result is
        saved); ``hf-prune prune`` does that itself.

        Under an initialised ``torch.distributed`` process group of several processes (``torchrun``,
        ``accelerate launch``; see ``hf_prune.engine.distributed``) every process calls ``prune`` with the same
        model, config and data: each calibrates on its share of the batches, the statistics are summed across
        processes, every process ends with the same pruned model, and only rank 0 writes the checkpoint (and, in
        ``save_pretrained`` / ``push_to_hub``, the output).
        """
        if isinstance(config, dict):
            config = PrunerConfig.from_dict(config)
        if not isinstance(config, PrunerConfig):
            raise TypeError(f"prune() needs a PrunerConfig (e.g. WandaConfig(sparsity=0.5)), got {type(config).__name__}.")
        if calibration_dataset is not None:  # the effective config records where the data came from
            config = dataclasses.replace(config, calibration=dataclasses.replace(config.calibration,
                                                                                dataset=calibration_dataset))
        spec = get_method(config.method)
        reads_text = spec.needs_data(config) and not is_prepared(config.calibration.dataset)
        # the effective config records the seq_len used: unset means the model's context when shorter than 2048
        config = dataclasses.replace(config, calibration=config.calibration.fit_seq_len(
            text_context(self.model) if reads_text else None))
        if spec.kind == "trained":
            raise HFPruneError(spec.how_to_run or f"{config.method} is trained with transformers.Trainer, not run by "
                               "Pruner.prune. The model was not changed.")
        reason = spec.serves(self.model, config) if spec.serves is not None else None
        if reason:  # what the README's family x method table says, checked before anything changes
            raise UnsupportedModelError(reason if reason.rstrip().endswith(".") else f"{reason}.")
        if (resume or restart) and checkpoint_dir is None:
            raise ValueError(f"{'resume' if resume else 'restart'}=True needs checkpoint_dir: the folder the "
                             "interrupted run checkpointed into.")
        if checkpoint_dir is None:
            result = spec.run(self, config, device=device, progress=progress)
        else:
            if not spec.resumable:
                raise CheckpointError(f"{config.method} cannot checkpoint or resume; resumable methods: "
                                      f"{', '.join(resumable_methods())}. Run it without checkpoint_dir/resume.")
            with RunCheckpoint(checkpoint_dir, resume=resume, restart=restart) as checkpoint:
                result = spec.run(self, config, device=device, progress=progress, checkpoint=checkpoint)
        self.results.append(result)
        return result

    # ------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: str | int = "5GB",
                        evaluations: list[dict] | None = None, finetuning: dict | None = None,
                        sections: list | None = None, repo_id: str | None = None, overwrite: bool = False) -> str:
        """Write the pruned model (safetensors), tokenizer/processor, ``pruning_config.json``,
        ``pruning_report.json``, the per-layer sparsity picture ``sparsity_per_layer.png`` (when matplotlib is
        installed), a ``README.md`` model card and, after an allocating method (ECoFLaP),
        ``sparsity_allocation.json`` with its PNG, atomically: the folder appears complete or not at all.
        Returns the folder's absolute path.

        ``evaluations``: dense-vs-pruned measurements for the card and its ``model-index``, e.g.
        ``[hf_prune.evaluation.perplexity_record(...)]``; ``finetuning``: the summary of a recovery fine-tuning
        run (``SparsityPreservingCallback.summary()``); ``sections``: extra ``(title, markdown)`` card sections;
        ``repo_id``: the Hub id the card's usage snippet loads from. All of them are kept in the report, so
        ``hf-prune push`` can re-render the same card for another repo.

        A structurally pruned model whose per-layer shapes a stock config cannot hold is saved with
        ``hf_prune_layout.py`` and an ``auto_map`` (see ``hf_prune.structured.layout``): it reloads with
        ``AutoModel...from_pretrained(folder, trust_remote_code=True)``.

        hf_prune never deletes a file it did not write: a folder holding a previous hf_prune output is replaced
        only with ``overwrite=True``; any other non-empty folder, the folder the model was loaded from, the working
        directory and the folders holding them are refused (``OutputDirError``) before anything is written."""
        if not self.results:
            raise ValueError("nothing was pruned yet: call pruner.prune(config, ...) before save_pretrained.")
        evaluations = check_evaluations(evaluations)
        sections = check_sections(sections)
        if finetuning is not None and not isinstance(finetuning, dict):
            raise TypeError(f"finetuning must be a dict (e.g. SparsityPreservingCallback.summary()), "
                            f"got {type(finetuning).__name__}.")
        check_model_output(self.model, save_directory, overwrite=overwrite)
        result = self.results[-1]
        report = dict(result.report)
        if self.source is not None and isinstance(report.get("model"), dict):  # the id as the user gave it
            report["model"] = {**report["model"], "name_or_path": self.source["name_or_path"],
                               **{k: v for k, v in self.source.items() if k != "name_or_path" and v}}
        if len(self.results) > 1:
            report["previous_runs"] = [r.report for r in self.results[:-1]]
        report["card"] = {"evaluations": evaluations, "finetuning": finetuning,
                          "sections": [s.to_dict() for s in sections]}
        changed = _zeros_changed(self.model, report)
        if changed:
            report["weights_changed_since_pruning"] = {"modules": len(changed), "examples": changed[:3]}
            warnings.warn(f"{len(changed)} pruned modules (e.g. {changed[0]}) no longer hold the zeros the pruning "
                          "left (was the model trained without hf_prune.callbacks.SparsityPreservingCallback?); the "
                          "card and report describe the pruning run and say that the weights changed since.",
                          stacklevel=2)

        def write_extras(folder: str, layout: dict | None) -> None:
            if layout is not None:  # per-layer widths a stock config cannot hold
                report["variable_layout"] = layout
            result.config.save_pretrained(folder)
            with open(os.path.join(folder, REPORT_NAME), "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=2, sort_keys=True, default=str)
                fh.write("\n")
            allocation_files = (result.allocation.save_pretrained(folder)
                                if isinstance(result.allocation, Allocation) else {})
            picture = plot_layer_sparsity(report, os.path.join(folder, SPARSITY_PICTURE))
            card = build_model_card(report, repo_id=repo_id, evaluations=evaluations, finetuning=finetuning,
                                    sections=sections, picture=SPARSITY_PICTURE if picture else None,
                                    allocation_plot=allocation_files.get("plot"))
            card.save(os.path.join(folder, CARD_NAME))

        # several processes (torch.distributed) hold the same model: the main one writes, every one gets the path
        return distributed.on_main(lambda: save_model_folder(self.model, save_directory, overwrite=overwrite,
                                                             max_shard_size=max_shard_size,
                                                             processing=(self.processor, self.tokenizer),
                                                             extras=write_extras))

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
                    commit_description: str | None = None, max_shard_size: str | int = "5GB",
                    evaluations: list[dict] | None = None, finetuning: dict | None = None,
                    sections: list | None = None):
        """Push the pruned model to the Hub: weights, tokenizer/processor, configs, report, picture and the
        generated card, in one commit (the repo is created first, so a missing network or token fails before
        anything is written). ``evaluations``/``finetuning``/``sections`` go to the card as in
        ``save_pretrained``. Returns ``huggingface_hub.CommitInfo`` (``.commit_url``, ``.pr_url``).

        Without network (or with ``HF_HUB_OFFLINE=1``) this raises ``hf_prune.errors.HubError`` naming the
        endpoint; ``HF_ENDPOINT`` selects another Hub."""
        if not self.results:
            raise ValueError("nothing was pruned yet: call pruner.prune(config, ...) before push_to_hub.")
        check_evaluations(evaluations)
        check_sections(sections)
        method = self.results[-1].config.method
        return distributed.on_main(lambda: push_pretrained(  # several processes: the main one pushes
            lambda folder: self.save_pretrained(folder, max_shard_size=max_shard_size, evaluations=evaluations,
                                                finetuning=finetuning, sections=sections, repo_id=repo_id),
            repo_id, private=private, token=token, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {method}-pruned model with hf_prune",
            commit_description=commit_description))
