"""Configuration objects: the ``PrunerConfig`` base, ``CalibrationConfig``, and the method registry.

A config is a keyword-only dataclass. It validates itself in ``__post_init__`` (the message names the
field, the value and what is allowed), serialises to ``pruning_config.json`` and comes back as the
right subclass through the registry keyed by ``method``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from .version import __version__

CONFIG_NAME = "pruning_config.json"

PACKINGS = ("auto", "concat", "pad")


# --------------------------------------------------------------------------------------------
# validation helpers shared by every config


def check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(
            f"{owner}.{name}={value!r} is not supported; choose one of {', '.join(repr(a) for a in allowed)}."
        )


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name}={value!r} must be an integer >= {minimum}.")


def check_number(owner: str, name: str, value: Any, low: float, high: float, *, high_inclusive: bool = False,
                 low_inclusive: bool = True) -> None:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok_type and (value >= low if low_inclusive else value > low) and (
        value <= high if high_inclusive else value < high)
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{owner}.{name}={value!r} must be a number in {lo}{low}, {high}{hi}.")


def _describe_object(obj: Any) -> str:
    """A stable, human-readable provenance string for an in-memory calibration source."""
    if isinstance(obj, (list, tuple)) and all(isinstance(t, str) for t in obj):
        digest = hashlib.sha256("\x00".join(obj).encode("utf-8")).hexdigest()[:16]
        return f"<in-memory list of {len(obj)} texts, sha256:{digest}>"
    fingerprint = getattr(obj, "_fingerprint", None)
    if fingerprint is not None:  # datasets.Dataset
        return f"<datasets.Dataset of {len(obj)} rows, fingerprint:{fingerprint}>"
    return f"<in-memory {type(obj).__name__}>"


# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class CalibrationConfig:
    """Where calibration data comes from and how it is cut into samples.

    ``dataset`` may be a Hub dataset name, a local ``.txt``/``.jsonl``/``.json``/``.csv`` file or folder,
    ``"builtin:python-docs"`` (prose from Python's own docstrings, shipped with every interpreter), a
    ``datasets.Dataset``, a list of strings, or an iterable of ready model-input dicts (a ``DataLoader``).

    ``packing``: ``"concat"`` joins all texts with blank lines, tokenises once and draws ``num_samples``
    distinct non-overlapping windows of exactly ``seq_len`` tokens (the Wanda/SparseGPT protocol);
    ``"pad"`` keeps each text as one sample, truncated to ``seq_len`` and padded (padding is excluded
    from every statistic); ``"auto"`` picks ``concat`` for causal language models and ``pad`` otherwise.
    """

    dataset: Any = None
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    image_column: str = "image"
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    batch_size: int = 8
    packing: str = "auto"

    def __post_init__(self) -> None:
        owner = "CalibrationConfig"
        check_int(owner, "num_samples", self.num_samples, 1)
        check_int(owner, "seq_len", self.seq_len, 2)
        check_int(owner, "batch_size", self.batch_size, 1)
        check_int(owner, "seed", self.seed, 0)
        check_choice(owner, "packing", self.packing, PACKINGS)
        for name in ("text_column", "image_column", "split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{owner}.{name} must be a non-empty string, got {getattr(self, name)!r}.")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["dataset"] is not None and not isinstance(out["dataset"], str):
            out["dataset"] = _describe_object(out["dataset"])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CalibrationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"CalibrationConfig: ignoring unknown keys {unknown} (written by a newer hf_prune?).",
                          stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type
    run: Callable[..., Any]  # run(pruner, config, *, device, progress) -> PruningResult


_METHODS: dict[str, MethodSpec] = {}


def register_method(config_class: type, run: Callable[..., Any]) -> None:
    """Register a pruning method: its config class (whose ``method`` names it) and its run function."""
    name = getattr(config_class, "method", "")
    if not name or name != name.lower():
        raise ValueError(f"{config_class.__name__}.method must be a non-empty lowercase name, got {name!r}.")
    if name in _METHODS and _METHODS[name].config_class is not config_class:
        raise ValueError(f"a pruning method named {name!r} is already registered "
                         f"({_METHODS[name].config_class.__name__}).")
    _METHODS[name] = MethodSpec(name, config_class, run)


def _ensure_builtin_methods() -> None:
    from . import methods  # noqa: F401  (importing registers every built-in method)


def get_method(name: str) -> MethodSpec:
    _ensure_builtin_methods()
    if name not in _METHODS:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(sorted(_METHODS))}.")
    return _METHODS[name]


def available_methods() -> list[str]:
    _ensure_builtin_methods()
    return sorted(_METHODS)


# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class PrunerConfig:
    """Base of every method's config. Subclasses set the class attribute ``method``."""

    method: ClassVar[str] = ""

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if type(self) is PrunerConfig:
            raise TypeError("PrunerConfig is abstract: use a method's config, e.g. WandaConfig(sparsity=0.5).")
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig.from_dict(self.calibration)
        if not isinstance(self.calibration, CalibrationConfig):
            raise TypeError(f"{type(self).__name__}.calibration must be a CalibrationConfig, "
                            f"got {type(self.calibration).__name__}.")

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"method": self.method, "hf_prune_version": __version__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, CalibrationConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())
        return path

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
                    commit_description: str | None = None):
        """Upload ``pruning_config.json`` (only: a README already in the repo is left alone) to ``repo_id``,
        creating the repo if needed; ``PrunerConfig.from_pretrained(repo_id)`` reads it back.
        Returns ``huggingface_hub.CommitInfo``; raises ``hf_prune.errors.HubError`` when the Hub is unreachable."""
        from .hub import push_pretrained

        return push_pretrained(self.save_pretrained, repo_id, private=private, token=token, revision=revision,
                               create_pr=create_pr,
                               commit_message=commit_message or f"Upload {self.method} pruning config with hf_prune",
                               commit_description=commit_description)

    @classmethod
    def from_dict(cls, data: dict) -> "PrunerConfig":
        data = dict(data)
        method = data.pop("method", None)
        written_by = data.pop("hf_prune_version", None)
        if method is None:
            if cls.method:
                method = cls.method
            else:
                raise ValueError("the config has no 'method' key; cannot tell which PrunerConfig subclass it is.")
        target = get_method(method).config_class
        if cls.method and not issubclass(target, cls):
            raise ValueError(f"the config is for method {method!r}, not {cls.__name__}.")
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"{target.__name__}: ignoring keys {unknown} written by hf_prune {written_by or 'unknown'} "
                f"(this is {__version__}); upgrade hf_prune to use them.", stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("calibration"), dict):
            kwargs["calibration"] = CalibrationConfig.from_dict(kwargs["calibration"])
        return target(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "PrunerConfig":
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, subfolder: str | None = None,
                        revision: str | None = None, token: str | bool | None = None) -> "PrunerConfig":
        """Load ``pruning_config.json`` from a folder (or a Hub repo) and return the right subclass."""
        path = os.fspath(path_or_repo)
        local = os.path.join(path, subfolder or "", CONFIG_NAME)
        if os.path.isfile(path):
            local = path
        if not os.path.isfile(local):
            if os.path.isdir(path):
                raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r}; was it written by Pruner.save_pretrained?")
            from huggingface_hub import hf_hub_download

            from .hub import hub_errors

            with hub_errors(f"download {CONFIG_NAME} from", path):
                local = hf_hub_download(path, CONFIG_NAME, subfolder=subfolder, revision=revision, token=token)
        return cls.from_json_file(local)
