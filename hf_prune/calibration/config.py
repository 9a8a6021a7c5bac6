"""``CalibrationConfig``: where calibration data comes from and how it is cut into samples."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from ..checks import check_choice, check_int, describe_object

PACKINGS = ("auto", "concat", "pad")


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
