"""ModHiFi (Kashyap et al.): structured pruning by subset fidelity with least-squares compensation
(``mode="prune"``) and class-wise unlearning (``mode="unlearn"``)."""

from __future__ import annotations

from typing import Any

from ...registry import register_method
from .config import ModHiFiConfig
from .prune import run_prune, serves
from .result import ModHiFiResult
from .unlearn import run_unlearn


def run_modhifi(pruner: Any, config: ModHiFiConfig, *, device: Any = None, progress: bool = True) -> ModHiFiResult:
    run = run_unlearn if config.mode == "unlearn" else run_prune
    return run(pruner, config, device=device, progress=progress)


register_method(ModHiFiConfig, run_modhifi, display_name="ModHiFi",
                needs_data=lambda config: config.needs_statistics, serves=serves)

__all__ = ["ModHiFiConfig", "ModHiFiResult", "run_modhifi"]
