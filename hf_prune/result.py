"""``PruningResult``: what ``Pruner.prune`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .engine.report import sparsity_table


@dataclass
class PruningResult:
    """The pruned model (the same object, changed in place), the config used, and the report.

    ``report`` is a JSON-ready dict: achieved sparsity per module, per block, per module kind and
    overall; time and peak memory; calibration provenance; the software it ran on.
    ``allocation`` holds a per-module sparsity allocation when the method produced one (ECoFLaP).
    ``path`` holds the ``SolutionPath`` a solution-path method read the model off (SPP).
    """

    config: Any
    report: dict
    model: nn.Module = field(repr=False)
    allocation: Any = None
    path: Any = field(default=None, repr=False)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all pruned modules."""
        return self.report["sparsity"]["overall"]["achieved"]

    def summary(self) -> str:
        rep = self.report
        run = rep["run"]
        peak = run.get("peak_rss_bytes")
        lines = [
            f"method={rep['method']} pattern={rep.get('pattern')} model={rep['model']['class']} "
            f"time={run['time_s']:.2f}s" + (f" peak_rss={peak / 2**20:.0f}MiB" if peak else ""),
            sparsity_table(rep["sparsity"]),
        ]
        if self.allocation is not None and hasattr(self.allocation, "summary"):
            lines += ["allocation (allocated sparsity per budget, and its least and most sparse group):",
                      self.allocation.summary()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
