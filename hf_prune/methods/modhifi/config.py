"""``ModHiFiConfig``: structured pruning by subset fidelity with least-squares compensation, and class unlearning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...checks import check_choice, check_int, check_number, describe_object
from ...config import PrunerConfig
from .ops import PER_OUTPUT_SCORES, SCORES

MODES = ("prune", "unlearn")
UNITS = ("neurons",)
SELECTIONS = ("per_layer_ratio", "global_ratio", "per_output_union")
COMPENSATIONS = ("least_squares", "none")
DAMP_MODES = ("relative", "absolute")
ACCUM_DTYPES = ("float32", "float64")
EDITS = ("auto", "zero", "negate")


@dataclass(kw_only=True)
class ModHiFiConfig(PrunerConfig):
    """ModHiFi: remove MLP neurons by subset fidelity and compensate the rest (mode="prune"), or edit the
    components that carry one class (mode="unlearn").

    Pruning (``mode="prune"``):

    - ``sparsity``: fraction of MLP hidden neurons removed (default 0.2). With ``per_output_union`` it is the
      paper's per-iteration removal percentile and the removed fraction emerges (reported).
    - ``unit``: ``"neurons"`` (MLP hidden neurons: gate/up rows + down column, or fc1 row + bias + fc2 column).
    - ``score``: ``"auto"`` (default: the paper's choice per setting, ``"cholesky_rownorm"`` for pruning
      transformer MLPs as in its LLM experiments, ``"singleton_fidelity"`` for unlearning as in its HiFi sets),
      ``"singleton_fidelity"``, ``"saliency"`` (App. D.2), ``"cholesky_rownorm"`` (App. D.2 read literally:
      activation energy x column norm), ``"greedy_fidelity"`` (ours: backward elimination on the compensated
      subset fidelity; sees redundancy, costs O(m^2) per removed neuron) or ``"l2_norm"`` (the data-free
      L2 structured baseline; not ModHiFi).
    - ``selection``: ``"per_layer_ratio"`` (same width in every block, so the stock config holds it; default),
      ``"global_ratio"`` (one budget per stage, spent where the layer-normalised scores are lowest: a dense
      scoring pass fixes the widths, then the sequential pass prunes) or ``"per_output_union"`` (the paper:
      keep every neuron in some output's top-(1-sparsity) HiFi set). Non-uniform widths save with a per-layer
      layout that reloads with ``trust_remote_code=True``.
    - ``compensation``: ``"least_squares"`` (closed form, Prop. 3.8 in weight space) or ``"none"``.
    - ``damp``: dampening of the Gram diagonal for the solve, relative to its mean (``damp_mode="relative"``,
      default 0.01) or absolute (``"absolute"``, the paper's 1e-4); raised tenfold up to ``max_damp`` if the
      Cholesky fails.
    - ``num_iterations``: prune in this many rounds, each re-collecting statistics on the already pruned model.
    - ``accum_dtype``: the Gram's accumulation dtype (solves are always float64).
    - ``generation_temperature``: the data-free path (no calibration data, causal LMs) samples
      ``calibration.num_samples`` sequences of ``calibration.seq_len`` tokens from the model itself at this
      temperature with a generator seeded by ``calibration.seed``.

    Unlearning (``mode="unlearn"``, classifiers): ``forget_data`` (samples of the class to forget; model-input
    batches, a ``datasets.Dataset``, a list of ``{text|image, label}`` records or a file) and optionally
    ``remain_data``; ``forget_class`` (default: the label of the forget samples, else the model's majority
    prediction on them); ``unlearn_fraction`` of each output's components are edited in the last
    ``unlearn_layers`` layers (all by default) with ``unlearn_edit`` (``"zero"`` for BatchNorm nets,
    ``"negate"`` for LayerNorm + residual nets, ``"auto"`` picks by the architecture); ``label_column``
    names the label of record-style data.
    """

    method: ClassVar[str] = "modhifi"

    mode: str = "prune"
    sparsity: float = 0.2
    unit: str = "neurons"
    score: str = "auto"
    selection: str = "per_layer_ratio"
    compensation: str = "least_squares"
    damp: float = 0.01
    damp_mode: str = "relative"
    max_damp: float = 1.0
    num_iterations: int = 1
    accum_dtype: str = "float32"
    generation_temperature: float = 1.0
    forget_data: Any = None
    remain_data: Any = None
    forget_class: int | None = None
    unlearn_fraction: float = 0.05
    unlearn_layers: int | None = None
    unlearn_edit: str = "auto"
    label_column: str = "label"

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_choice(owner, "mode", self.mode, MODES)
        check_number(owner, "sparsity", self.sparsity, 0.0, 1.0)
        self.sparsity = float(self.sparsity)
        check_choice(owner, "unit", self.unit, UNITS)
        check_choice(owner, "score", self.score, ("auto", *SCORES))
        if self.score == "auto":
            self.score = "cholesky_rownorm" if self.mode == "prune" else "singleton_fidelity"
        check_choice(owner, "selection", self.selection, SELECTIONS)
        check_choice(owner, "compensation", self.compensation, COMPENSATIONS)
        check_choice(owner, "damp_mode", self.damp_mode, DAMP_MODES)
        check_number(owner, "damp", self.damp, 0.0, 100.0, low_inclusive=False, high_inclusive=True)
        check_number(owner, "max_damp", self.max_damp, self.damp, 1e6, high_inclusive=True)
        check_int(owner, "num_iterations", self.num_iterations, 1)
        check_choice(owner, "accum_dtype", self.accum_dtype, ACCUM_DTYPES)
        check_number(owner, "generation_temperature", self.generation_temperature, 0.0, 100.0, low_inclusive=False,
                     high_inclusive=True)
        check_number(owner, "unlearn_fraction", self.unlearn_fraction, 0.0, 1.0, low_inclusive=False,
                     high_inclusive=True)
        if self.unlearn_layers is not None:
            check_int(owner, "unlearn_layers", self.unlearn_layers, 1)
        if self.forget_class is not None:
            check_int(owner, "forget_class", self.forget_class, 0)
        check_choice(owner, "unlearn_edit", self.unlearn_edit, EDITS)
        if not isinstance(self.label_column, str) or not self.label_column:
            raise ValueError(f"{owner}.label_column must be a non-empty string, got {self.label_column!r}.")
        if self.selection == "per_output_union" and self.score not in PER_OUTPUT_SCORES:
            raise ValueError(f"{owner}: selection='per_output_union' ranks neurons per output, which "
                             f"score={self.score!r} cannot; use one of {', '.join(map(repr, PER_OUTPUT_SCORES))}.")
        if self.mode == "prune" and (self.forget_data is not None or self.remain_data is not None):
            raise ValueError(f"{owner}: forget_data/remain_data are only read with mode='unlearn'; set "
                             "mode='unlearn' or leave them out.")
        if self.mode == "unlearn":
            if self.forget_data is None:
                raise ValueError(f"{owner}(mode='unlearn') needs forget_data: samples of the class to forget "
                                 "(model-input batches, a datasets.Dataset, records with a label, or a file).")
            if self.score not in PER_OUTPUT_SCORES:
                raise ValueError(f"{owner}(mode='unlearn') selects (output, component) pairs; score={self.score!r} "
                                 f"has no per-output form; use one of {', '.join(map(repr, PER_OUTPUT_SCORES))}.")

    @property
    def needs_statistics(self) -> bool:
        """Whether pruning reads activations (everything except the data-free L2 baseline without compensation)."""
        return self.mode == "unlearn" or self.score != "l2_norm" or self.compensation != "none"

    def to_dict(self) -> dict:
        out = super().to_dict()
        for name in ("forget_data", "remain_data"):
            value = out[name]
            if value is not None and not isinstance(value, str):
                out[name] = describe_object(value)
        return out
