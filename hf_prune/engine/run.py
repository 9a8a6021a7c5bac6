"""The run skeleton every method's glue shares: check the model, find its family and stages, pick the execution
device (``prepare``); build calibration data for the stages walked, walk them and report (``RunContext``); and,
when a failure comes after weights were already changed, say so (``changed_in_place``).

A method's run function keeps only what is particular to it: which modules it targets, its block processor,
its phases and its own report sections.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..calibration.config import CalibrationConfig
from ..calibration.data import CalibrationSet, build_calibration
from ..errors import HFPruneError, OffloadError
from ..models import Family, Stage, get_family, text_context
from . import distributed
from .offload import offload_folders
from .report import RunMeter, run_report
from .targets import Target, calibration_needs, check_finite, check_model_ready, stages_with_targets
from .walker import BlockProcessor, resolve_device, walk


@dataclass(frozen=True)
class RunContext:
    """A checked model with its family, the stages a run walks and the device it computes on."""

    model: nn.Module
    family: Family
    stages: list[Stage]
    device: torch.device
    split: dict = dataclasses.field(default_factory=dict)  # how the walks split the batches across processes

    def with_stages(self, stages: list[Stage]) -> "RunContext":
        """The same run restricted to ``stages`` (e.g. the MLP stages a structured method prunes)."""
        return dataclasses.replace(self, stages=list(stages))

    def for_targets(self, targets: list[Target]) -> "RunContext":
        """The same run restricted to the stages that hold a target: the only ones walked and calibrated."""
        return self.with_stages(stages_with_targets(self.stages, targets))

    @property
    def needs(self) -> set[str]:
        """The model inputs the walked stages read (``input_ids``, ``pixel_values``)."""
        return calibration_needs(self.stages)

    def calibration(self, config: CalibrationConfig, source: Any = None, *, tokenizer: Any,
                    processor: Any) -> CalibrationSet:
        """Calibration batches of the inputs the walked stages need (``source`` overrides ``config.dataset``),
        packed as the family's model kind wants, in sequences that fit the walked stages' context."""
        return build_calibration(config, source, tokenizer=tokenizer, processor=processor, needs=self.needs,
                                 causal_lm=self.family.causal_lm, context=text_context(self.model, self.stages))

    def walk(self, batches: list[dict] | None, processor: BlockProcessor, *, progress: bool, desc: str,
             **options: Any) -> None:
        """Walk the stages block by block on the execution device (``options``: ``engine.walker.walk``'s
        ``stats_dtype`` and ``checkpoint``)."""
        walk(self.model, self.stages, batches, processor, device=self.device, progress=progress, desc=desc,
             **options)
        split = distributed.split_record(len(batches)) if batches is not None else None
        if split is not None:
            self.split.update(split)

    def report(self, config: Any, *, pattern: str, entries: dict[str, dict], block_of: dict[str, str],
               calibration: dict, meter: RunMeter, mode: str | None = None, record: dict | None = None,
               sections: dict | None = None) -> dict:
        """The run's report (``engine.report.run_report``) for this model, family, stages and device."""
        report = run_report(self.model, self.family.name, self.stages, config, pattern=pattern, entries=entries,
                            block_of=block_of, calibration=calibration, meter=meter, device=self.device, mode=mode,
                            record=record, sections=sections)
        if self.split:  # a data-parallel run: how many processes, and which batches each took (the card says it)
            distributed.record_split(report, self.split)
        return report


def prepare(model: nn.Module, device: str | torch.device | None = None, *, offload: bool = False) -> RunContext:
    """Check that ``model`` is a real model with real, finite weights (``offload=True``: accelerate offload is
    fine), find its family and stages and resolve the execution device; raises before any weight changes."""
    check_model_ready(model, offload=offload)
    family = get_family(model)
    check_finite(model)
    if offload and distributed.active():  # each process writes its pruned offloaded blocks: never the same folder
        distributed.check_private_folders(
            offload_folders(model), "the offload folder",
            "give each process its own (e.g. offload_folder=f'offload-{LOCAL_RANK}', --offload-folder "
            "offload-$LOCAL_RANK) or load without disk offload", error=OffloadError)
    return RunContext(model, family, family.stages(model), resolve_device(model, device))


@contextlib.contextmanager
def changed_in_place(count: Callable[[], int], what: str, **fields: Any) -> Iterator[None]:
    """Re-raise an ``HFPruneError`` raised once the model was changed with a note that tells the user to reload.

    ``count()`` says how many units were changed so far (nothing changed: the error passes unchanged); ``what``
    completes "Note: ... in place before this failure", with ``{n}`` for the count and ``fields`` for the rest,
    e.g. ``"{n} of {total} modules were already pruned"``."""
    try:
        yield
    except HFPruneError as exc:
        n = count()
        if n:
            raise type(exc)(f"{exc} Note: {what.format(n=n, **fields)} in place before this failure; reload the "
                            "model before retrying.") from exc
        raise
