"""Named exceptions. Every one is a ``ValueError`` so callers that catch bad input generically still do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """`` Did you mean a, b?`` with the closest of ``names`` to ``name`` (empty when none is close), for the end
    of an error message about an unknown name."""
    near = difflib.get_close_matches(name, list(names), n=3)
    return f" Did you mean {', '.join(near)}?" if near else ""


class HFPruneError(ValueError):
    """Base class of the errors hf_prune raises on bad input or an unusable model."""


class UnsupportedModelError(HFPruneError):
    """The model family is not one the block walker knows."""


class CalibrationDataError(HFPruneError):
    """Calibration data is missing, empty, too short, or lacks the named column."""


class NonFiniteStatisticsError(HFPruneError):
    """NaN or inf appeared in activation statistics (Hessians, norms, Grams)."""


class OutputDirError(HFPruneError):
    """The output folder cannot be written."""


class HubError(HFPruneError):
    """The Hugging Face Hub could not be reached, refused the request, or offline mode is on."""


class PushFolderError(HFPruneError):
    """A folder to push holds what must not be uploaded: a link to something outside it, or an entry that is not
    a regular file."""


class OffloadError(HFPruneError):
    """The model's placement (accelerate offload, meta weights) is one the engine cannot prune."""


class CheckpointError(HFPruneError):
    """A resumable run's checkpoint is missing, unreadable, or belongs to another model, config or data."""


class ModelLoadError(HFPruneError):
    """The model cannot be loaded: no such folder, a truncated or corrupt weights file, pickle-only weights, or a
    Hub id that is neither cached nor reachable."""


class ConfigFileError(HFPruneError):
    """A ``pruning_config.json`` or ``pruning_report.json`` is not valid JSON or lacks what hf_prune writes there."""


class SequenceLengthError(HFPruneError):
    """A ``seq_len`` is longer than the model's context (the most tokens its position embeddings cover)."""


class DeviceError(HFPruneError):
    """The execution device is not a torch device, or not present on this machine."""


class RegexTimeoutError(HFPruneError):
    """A module-selection regex took too long to match (catastrophic backtracking)."""


class NonFiniteWeightsError(HFPruneError):
    """A parameter or buffer of the model holds NaN or inf before anything was changed."""
