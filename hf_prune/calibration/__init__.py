"""Calibration: data sources -> token batches, the block walker, and the statistics hooks."""

from .corpus import builtin_texts
from .data import CalibrationSet, build_calibration, load_texts
from .stats import LinearStats, StatsCollector
from .walker import BlockProcessor, walk

__all__ = ["BlockProcessor", "CalibrationSet", "LinearStats", "StatsCollector", "build_calibration",
           "builtin_texts", "load_texts", "walk"]
