"""Calibration data: its config, the sources (datasets, lists, files, the built-in corpus, self-generated
sequences) and the token batches the engine walks."""

from .config import CalibrationConfig
from .corpus import builtin_texts
from .data import CalibrationSet, build_calibration, load_texts

__all__ = ["CalibrationConfig", "CalibrationSet", "build_calibration", "builtin_texts", "load_texts"]
