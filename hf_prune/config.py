"""``PrunerConfig``: the base of every method's config.

A config is a keyword-only dataclass. It validates itself in ``__post_init__`` (the message names the
field, the value and what is allowed), serialises to ``pruning_config.json`` and comes back as the
right subclass through the method registry (``hf_prune.registry``) keyed by ``method``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .artifacts.hub import load_files, push_pretrained
from .atomic import atomic_file
from .calibration.config import CalibrationConfig
from .checks import check_choice, check_int, check_number  # noqa: F401  (re-exported for method configs)
from .errors import ConfigFileError
from .registry import available_methods, get_method, register_method  # noqa: F401  (re-exported)
from .version import __version__

CONFIG_NAME = "pruning_config.json"


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
            if f.metadata.get("omit_default") and value == f.default:
                continue  # an option of some models only (e.g. MoE experts): written once it is set
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
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())
        return path

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
                    commit_description: str | None = None):
        """Upload ``pruning_config.json`` (only: a README already in the repo is left alone) to ``repo_id``,
        creating the repo if needed; ``PrunerConfig.from_pretrained(repo_id)`` reads it back.
        Returns ``huggingface_hub.CommitInfo``; raises ``hf_prune.errors.HubError`` when the Hub is unreachable."""
        return push_pretrained(self.save_pretrained, repo_id, private=private, token=token, revision=revision,
                               create_pr=create_pr,
                               commit_message=commit_message or f"Upload {self.method} pruning config with hf_prune",
                               commit_description=commit_description)

    @classmethod
    def from_dict(cls, data: dict) -> "PrunerConfig":
        if not isinstance(data, Mapping):
            raise ConfigFileError(f"a pruning config is a JSON object such as {{\"method\": \"wanda\", ...}}, not a "
                                  f"{type(data).__name__}.")
        data = dict(data)
        method = data.pop("method", None)
        written_by = data.pop("hf_prune_version", None)
        if method is None:
            if cls.method:
                method = cls.method
            else:
                raise ValueError("the config has no 'method' key; cannot tell which PrunerConfig subclass it is.")
        if not isinstance(method, str):
            raise ConfigFileError(f"the config's 'method' must be one method name such as 'wanda', not "
                                  f"{method!r}; available: {', '.join(available_methods())}.")
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
        """Read a ``pruning_config.json``; a file that is not valid UTF-8 JSON or not a config object is a
        ``ConfigFileError`` naming the file."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except UnicodeDecodeError:
            raise ConfigFileError(f"{path} is not valid UTF-8; a pruning config is a UTF-8 JSON file.") from None
        except json.JSONDecodeError as exc:
            raise ConfigFileError(f"{path}:{exc.lineno} is not valid JSON ({exc.msg}); fix it or save the config "
                                  "again with PrunerConfig.save_pretrained.") from None
        try:
            return cls.from_dict(data)
        except ConfigFileError as exc:
            raise ConfigFileError(f"{path}: {exc}") from None

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, subfolder: str | None = None,
                        revision: str | None = None, token: str | bool | None = None) -> "PrunerConfig":
        """Load ``pruning_config.json`` from a folder (or a Hub repo) and return the right subclass."""
        path = os.fspath(path_or_repo)
        if os.path.isfile(path):
            return cls.from_json_file(path)
        local = load_files(path, [CONFIG_NAME], what=CONFIG_NAME, writer="Pruner.save_pretrained",
                           subfolder=subfolder, revision=revision, token=token)[CONFIG_NAME]
        return cls.from_json_file(local)
