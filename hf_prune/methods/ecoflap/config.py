"""``ECoFLaPConfig``: global, loss-aware sparsity allocation in front of any layer-wise pruner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...checks import check_choice, check_int, check_number, regex_list
from ...config import PrunerConfig
from ...patterns import Pattern
from ...registry import default_method, get_method, method_specs
from ..layerwise import LayerwiseConfig

GRANULARITIES = ("block", "layer", "submodel")
SCORES = ("zeroth_order", "first_order")
AGGREGATES = ("sum", "mean")
PERTURBS = ("tensor", "design", "block")
# fields of the stage-2 config that ECoFLaP sets itself
_OWNED = ("sparsity", "pattern", "target_modules", "exclude_modules", "module_sparsity", "calibration")


def layerwise_methods() -> list[str]:
    """The registered methods that can run as stage 2 (they take a per-module ``module_sparsity``)."""
    return sorted(spec.name for spec in method_specs() if spec.layerwise)


@dataclass(kw_only=True)
class ECoFLaPConfig(PrunerConfig):
    """ECoFLaP (Sung et al., ICLR 2024): per-layer sparsities from global scores, then a layer-wise pruner.

    Stage 1 scores every group with the model's own loss and turns the scores into per-group sparsities:
    each group keeps at least ``1 - max_sparsity`` of its weights and the rest of the budget goes in
    proportion to the scores (groups that would exceed density 1 are capped and their excess handed on).
    Stage 2 runs ``layer_pruner`` (any registered layer-wise method) with those sparsities.

    - ``sparsity``: overall fraction removed over the pruned modules (per sub-model with
      ``per_submodel_budget``); ``max_sparsity``: no group sparser than this (default ``sparsity + 0.1``,
      as in every released script; ``(1 + sparsity) / 2`` when that would reach 1).
    - ``granularity``: a group is a transformer ``"block"`` (paper default), a Linear ``"layer"``, or a whole
      ``"submodel"`` (CLIP's towers; BLIP-2's vision tower, Q-Former, language model).
    - ``per_submodel_budget``: solve the allocation separately inside each sub-model, so each meets
      ``sparsity`` (the released ``--prune_per_model``); default one global budget.
    - ``score``: ``"zeroth_order"`` (forward passes only: |L(W+eps z) - L(W-eps z)| / 2eps with Gaussian z,
      an estimate of the gradient norm) or ``"first_order"`` (one backward per batch with checkpointed
      blocks; sum |W| * |dL/dW|, each gradient reduced and freed as soon as it is complete).
    - ``aggregate``: a group's score is the ``"sum"`` over its weights, or their ``"mean"``.
    - ``zo_eps``, ``zo_num_noise``: perturbation size and number of Gaussian directions per batch.
    - ``zo_perturb``: how a batch's forward passes perturb the weights. ``"tensor"``: one weight tensor at a time,
      2 passes per Linear (the paper). ``"design"`` (default, ours): the paper's per-tensor statistic, cheaper: the
      Linears of a block are perturbed together, each along its own direction (the one ``"tensor"`` draws) with
      the signs of a Hadamard matrix, and each one's |<grad, z>| is read off the signed sum of the passes: 8 passes
      for a LLaMA block's 7 Linears instead of 14 (8 for OPT/BERT's 6 instead of 12). Its error is O(zo_eps) (the
      other tensors' cross terms; ``"tensor"``'s central difference is O(zo_eps^2)): on the shared trained decoder it
      allocated every block within 0.001 of ``"tensor"`` with the same samples. ``"block"`` is ours too: one
      direction for all of a group's weights, one pair of passes per group (7x fewer for LLaMA blocks); it
      estimates the norm of the group's whole gradient, a different statistic from the sum of its tensors' norms.
      A label-free loss perturbs one tensor at a time with ``"design"`` (its one-sided passes need no pair).
    - ``num_score_samples``: calibration samples scored (default 8; the most, with early stopping; stage 2 uses
      ``calibration.num_samples``); both are drawn from ``calibration``'s source and seed. On the shared trained
      decoder at 60% (64 x 256 calibration tokens, ``benchmarks/ecoflap_cost.py``) the defaults (``"design"``, 8
      samples) allocated every block within 0.012 of the paper's setting (``"tensor"``, 32 samples: 15x a uniform
      Wanda run) and within 0.001 of the previous default (``"tensor"``, 8 samples: 4.3x) at the same held-out
      perplexity (6.092 / 6.108 / 6.090), for 2.9-3.1x a uniform Wanda run in all (stage 1 and the Wanda stage).
    - Early stopping (zeroth order, off by default): ``zo_stop_tol`` scores ``zo_round_samples`` (default 8)
      samples at a time (in batches of at most that many), turns the running scores into the allocation after each
      round, and stops at the first round, once ``zo_min_samples`` (default two rounds) are scored, where no group's
      sparsity moved by more than ``zo_stop_tol`` (e.g. 0.01) since the previous round; at most
      ``num_score_samples``. The decision reads only values summed across processes, so every rank of a
      data-parallel run stops after the same round. The report's ``allocation.provenance.early_stopping`` records
      the rounds, the samples used and why it stopped. ``zo_stop_tol=None`` (default) scores every sample in
      batches of ``calibration.batch_size``, exactly as before early stopping existed. The score depends on the
      batch size (|<grad of a batch's loss, z>| includes the batch's gradient noise): rounds smaller than
      ``calibration.batch_size`` are cheaper per round but shift the allocation (on the shared decoder, batches of 2
      moved every block by up to 0.017 from batches of 8 at 32 samples). E.g. ``num_score_samples=32,
      zo_stop_tol=0.01`` for a steadier allocation that stops once it has settled.
    - ``layer_pruner``: stage 2, one of the registered layer-wise methods (``"wanda"``, ``"sparsegpt"``,
      ``"ria"``, ``"magnitude"``); ``layer_pruner_kwargs``: its own options, e.g. ``{"block_size": 64}``.
    - ``pattern``: only ``"unstructured"``: an N:M pattern fixes every module's sparsity, leaving nothing
      to allocate. ``target_modules`` / ``exclude_modules``: as for every layer-wise pruner.

    The losses: causal LMs their own next-token loss; BLIP-2 the caption loss on its text tokens; batches
    with ``labels`` the model's own loss; CLIP with images and texts its contrastive loss; models with no
    labels (encoders, single towers) an output-sensitivity loss (see ``hf_prune.methods.ecoflap.losses``).
    """

    method: ClassVar[str] = "ecoflap"

    sparsity: float = 0.5
    max_sparsity: float | None = None
    granularity: str = "block"
    per_submodel_budget: bool = False
    score: str = "zeroth_order"
    aggregate: str = "sum"
    zo_eps: float = 1e-3
    zo_num_noise: int = 1
    zo_perturb: str = "design"
    num_score_samples: int = 8
    zo_stop_tol: float | None = None
    zo_round_samples: int = 8
    zo_min_samples: int | None = None
    layer_pruner: str = field(default_factory=default_method)  # the registry's default layer-wise pruner
    layer_pruner_kwargs: dict[str, Any] | None = None
    pattern: str = "unstructured"
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_number(owner, "sparsity", self.sparsity, 0.0, 1.0)
        self.sparsity = float(self.sparsity)
        if self.max_sparsity is None:
            default = round(self.sparsity + 0.1, 12)
            self.max_sparsity = default if default < 1.0 else (1.0 + self.sparsity) / 2
        check_number(owner, "max_sparsity", self.max_sparsity, 0.0, 1.0)
        self.max_sparsity = float(self.max_sparsity)
        if self.max_sparsity < self.sparsity:
            raise ValueError(f"{owner}.max_sparsity={self.max_sparsity!r} is below sparsity={self.sparsity!r}; "
                             "no group may be sparser than max_sparsity, so it must be >= sparsity "
                             "(the paper uses sparsity + 0.1).")
        check_choice(owner, "granularity", self.granularity, GRANULARITIES)
        if not isinstance(self.per_submodel_budget, bool):
            raise ValueError(f"{owner}.per_submodel_budget={self.per_submodel_budget!r} must be True or False.")
        check_choice(owner, "score", self.score, SCORES)
        check_choice(owner, "aggregate", self.aggregate, AGGREGATES)
        check_number(owner, "zo_eps", self.zo_eps, 0.0, 1.0, low_inclusive=False, high_inclusive=True)
        self.zo_eps = float(self.zo_eps)
        check_int(owner, "zo_num_noise", self.zo_num_noise, 1)
        check_choice(owner, "zo_perturb", self.zo_perturb, PERTURBS)
        check_int(owner, "num_score_samples", self.num_score_samples, 1)
        self._check_stopping(owner)
        pattern = Pattern.parse(self.pattern)
        if pattern.is_nm:
            raise ValueError(f"{owner}.pattern={self.pattern!r}: an N:M pattern removes exactly "
                             f"{pattern.sparsity:g} of every module, so there is no per-layer sparsity to allocate; "
                             "use pattern='unstructured' (or prune with an N:M layer-wise method directly).")
        self.pattern = str(pattern)
        self.target_modules = regex_list(owner, "target_modules", self.target_modules)
        self.exclude_modules = regex_list(owner, "exclude_modules", self.exclude_modules)
        choices = layerwise_methods()
        if self.layer_pruner not in choices:
            raise ValueError(f"{owner}.layer_pruner={self.layer_pruner!r} is not a layer-wise pruner; choose one of "
                             f"{', '.join(repr(c) for c in choices)}.")
        if self.layer_pruner_kwargs is not None:
            if not isinstance(self.layer_pruner_kwargs, dict):
                raise ValueError(f"{owner}.layer_pruner_kwargs must be a dict of {self.layer_pruner} options, got "
                                 f"{type(self.layer_pruner_kwargs).__name__}.")
            owned = sorted(set(self.layer_pruner_kwargs) & set(_OWNED))
            if owned:
                raise ValueError(f"{owner}.layer_pruner_kwargs sets {owned}, which ECoFLaP sets itself; set them on "
                                 f"{owner} instead.")
        self.layer_pruner_config()  # validates layer_pruner_kwargs now, not after the scores were computed

    def _check_stopping(self, owner: str) -> None:
        check_int(owner, "zo_round_samples", self.zo_round_samples, 1)
        if self.zo_min_samples is not None:
            self._check_min_samples(owner)
        if self.zo_stop_tol is None:
            return
        if isinstance(self.zo_stop_tol, bool) or not isinstance(self.zo_stop_tol, (int, float)) \
                or not 0.0 < self.zo_stop_tol < 1.0:
            raise ValueError(f"{owner}.zo_stop_tol={self.zo_stop_tol!r} must be a sparsity change in (0, 1) (e.g. "
                             "0.01: stop once no group's sparsity moves by more than 0.01 between two rounds), or "
                             "None to score all num_score_samples in one go, without early stopping.")
        self.zo_stop_tol = float(self.zo_stop_tol)
        if self.zo_min_samples is None:
            self.zo_min_samples = min(2 * self.zo_round_samples, self.num_score_samples)

    def _check_min_samples(self, owner: str) -> None:
        if isinstance(self.zo_min_samples, bool) or not isinstance(self.zo_min_samples, int) \
                or not 1 <= self.zo_min_samples <= self.num_score_samples:
            raise ValueError(f"{owner}.zo_min_samples={self.zo_min_samples!r} must be an integer between 1 and "
                             f"num_score_samples={self.num_score_samples} (the most early stopping may score); "
                             "lower it or raise num_score_samples.")

    def layer_pruner_config(self, module_sparsity: Any = None) -> LayerwiseConfig:
        """The stage-2 config: ``layer_pruner`` with this config's shared fields and ``module_sparsity``."""
        cls = get_method(self.layer_pruner).config_class
        kwargs = dict(self.layer_pruner_kwargs or {})
        try:
            return cls(sparsity=self.sparsity, pattern=self.pattern, target_modules=self.target_modules,
                       exclude_modules=self.exclude_modules, module_sparsity=module_sparsity,
                       calibration=self.calibration, **kwargs)
        except TypeError as exc:
            raise ValueError(f"{type(self).__name__}.layer_pruner_kwargs={kwargs!r} is not valid for "
                             f"{cls.__name__} ({exc}).") from None
