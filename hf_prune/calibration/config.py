"""``CalibrationConfig``: where calibration data comes from and how it is cut into samples."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from ..checks import check_choice, check_int, describe_object
from ..errors import SequenceLengthError

PACKINGS = ("auto", "concat", "pad")
DEFAULT_SEQ_LEN = 2048  # tokens per sample when seq_len is unset and the model's context is at least as long
SEED_MAX = 2**64 - 1  # the largest seed a torch.Generator takes


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

    ``seq_len`` unset (None) means the model's context (``max_position_embeddings`` of the stages that read
    ``input_ids``) when that is shorter than ``DEFAULT_SEQ_LEN`` (2048), else 2048; it is fixed when the model is
    known (``fit_seq_len``), and the run's config and report record the number used. An explicit ``seq_len``
    longer than the model's context is refused.
    """

    dataset: Any = None
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    image_column: str = "image"
    num_samples: int = 128
    seq_len: int | None = None
    seed: int = 0
    batch_size: int = 8
    packing: str = "auto"

    def __post_init__(self) -> None:
        owner = "CalibrationConfig"
        check_int(owner, "num_samples", self.num_samples, 1)
        if self.seq_len is not None:
            check_int(owner, "seq_len", self.seq_len, 2)
        check_int(owner, "batch_size", self.batch_size, 1)
        check_int(owner, "seed", self.seed, 0, SEED_MAX)
        check_choice(owner, "packing", self.packing, PACKINGS)
        for name in ("text_column", "image_column", "split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{owner}.{name} must be a non-empty string, got {getattr(self, name)!r}.")

    def fit_seq_len(self, context: int | None) -> "CalibrationConfig":
        """This config with ``seq_len`` fixed for a model that reads at most ``context`` tokens per sequence (None:
        no text input, or no known limit): unset becomes ``min(DEFAULT_SEQ_LEN, context)``; an explicit value past
        ``context`` is a ``SequenceLengthError`` naming both numbers."""
        return dataclasses.replace(self, seq_len=fit_seq_len(self.seq_len, context, "CalibrationConfig.seq_len"))

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["dataset"] is not None and not isinstance(out["dataset"], str):
            out["dataset"] = describe_object(out["dataset"])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CalibrationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"CalibrationConfig: ignoring unknown keys {unknown} (written by a newer hf_prune?).",
                          stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


def fit_seq_len(seq_len: int | None, context: int | None, name: str = "seq_len") -> int:
    """The sequence length to use for a model that reads at most ``context`` tokens (None: no known limit):
    ``seq_len`` itself when it fits, ``min(DEFAULT_SEQ_LEN, context)`` when it is None, and a
    ``SequenceLengthError`` naming both numbers when it is longer than the context (``name``: how the message
    calls it, e.g. ``--seq-len``'s field)."""
    if seq_len is None:
        return DEFAULT_SEQ_LEN if context is None else min(DEFAULT_SEQ_LEN, context)
    if context is not None and seq_len > context:
        raise SequenceLengthError(
            f"{name}={seq_len} is longer than the model's context of {context} tokens (max_position_embeddings); "
            f"use seq_len <= {context}, or leave it unset to use the model's context.")
    return seq_len


def context_note(seq_len: int, context: int | None) -> str | None:
    """What a report says when ``seq_len`` is the model's context because that is shorter than the default
    (None when the default applies unchanged)."""
    if context is None or seq_len != context or context >= DEFAULT_SEQ_LEN:
        return None
    return f"the model's context ({context} tokens, max_position_embeddings), shorter than the default {DEFAULT_SEQ_LEN}"
