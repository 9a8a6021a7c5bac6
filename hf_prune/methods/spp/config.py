"""``SPPConfig``: every knob of solution-path pruning (the search, the read-off, the training-free variant)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ...checks import check_choice, check_int, check_number, regex_list
from ...config import PrunerConfig

GROUPS = ("qk", "vo", "mlp")
COUPLINGS = ("released", "split_lbi")
BUDGETS = ("params", "flops", "entries")
SCOPES = ("per_group", "global")
ORDERS = ("first_entry", "on_count")
# the threshold's unit differs: released z integrates alpha (the released code hard-codes lam=3); split LBI's
# integrates alpha / nu, so with nu=100 the same search reaches a hundred times less
LAM_DEFAULTS = {"released": 3.0, "split_lbi": 0.01}


@dataclass(kw_only=True)
class SPPConfig(PrunerConfig):
    """Solution Path Pruning (Ding et al., ICLR 2025): one inverse-scale-space search gives every sparsity.

    Search (``attach_masks`` + ``hf_prune.callbacks.SolutionPathCallback`` in a ``Trainer``):

    - ``groups``: which structures get masks: ``"qk"`` (one entry per q-k head dimension, tied across each RoPE
      rotary pair; with grouped-query attention a k dimension serves its whole query group), ``"vo"`` (per v-o
      dimension) and ``"mlp"`` (per hidden neuron of gate/up/down or fc1/fc2).
    - ``share_across_heads``: one attention mask per block shared by every (key/value) head, as the released
      DeiT code does (True), or one per head (False).
    - ``lr``: learning rate of the mask optimizer (AdamW on the masks only; the backbone is frozen). The
      ``Trainer`` must use it (``config.training_arguments(...)`` builds matching ``TrainingArguments``);
      ``weight_decay``, ``adam_epsilon``, ``lr_scheduler``, ``min_lr`` and ``warmup_steps`` are the released
      search schedule (AdamW, eps 1e-4, no decay, cosine to 1e-5, no warmup).
    - ``coupling="split_lbi"`` (default): hf_prune's discretisation of Split LBI, not DessiLBI's own update: the
      masks also feel the coupling gradient (alpha - Gamma) / nu, which pulls them toward the sparse Gamma while
      the task loss holds the important ones up, but it goes through the masks' AdamW with the task gradient (so
      Adam normalises it); the shrinkage is one-sided, Gamma = kappa * max(z - lam, 0) (masks are non-negative, so
      only the positive side enters); and the z step z <- z + eta (alpha - Gamma) / nu uses the new mask
      alpha_{k+1}, after the optimizer step.
      ``"released"``: the paper code's dynamics, as released: the masks follow the task loss only (the coupling is computed but never
      back-propagated there); z <- z + kappa * eta * (alpha - Gamma), Gamma = max(z - lam, 0). eta is the Adam
      step lr / (1 - beta1^k) when ``adam_bias_correction`` (as released), else lr.
    - ``kappa``, ``nu``, ``lam``: an entry enters once its integrated mask passes ``lam`` (default 3.0 for
      ``released``, the released code's hard-coded value; 0.01 for ``split_lbi``, whose z moves nu times slower).
      Entries that never enter are ranked by z, so a too large ``lam`` still gives a full ranking.
    - ``record_every``: every so many optimizer steps each entry's ``on_count`` grows if it is on (the released
      ``step_record``); first-entry times are recorded at every step on the path time (cumulative learning rate).

    Read-off (``SolutionPath.masks_at`` / ``materialize``, and ``Pruner.prune`` with ``path=...``):

    - ``sparsity``: fraction removed, measured in ``budget`` units: ``"params"`` (parameters the entries remove),
      ``"flops"`` (per-token multiply-adds, attention scores over ``flops_seq_len`` tokens), ``"entries"``.
    - ``scope``: ``"per_group"`` (each of qk/vo/mlp loses the same fraction, as the released read-off) or
      ``"global"`` (one ranking over all entries).
    - ``order``: rank entries by ``"first_entry"`` time (ties: larger z first) or by the released ``"on_count"``.
    - ``min_keep``: entries every block keeps in each group (the highest ranked), so no block loses a whole group.
    - ``path``: a saved ``SolutionPath`` (folder or Hub id) to read from in ``Pruner.prune``. Without it,
      ``Pruner.prune`` refuses unless ``training_free=True`` asks for the experimental variant below.

    Training-free variant (ours, experimental, unstructured, for LLMs; ``ops.iss_weight_path``): opt in with
    ``training_free=True`` (no path). It is not the default because it does not beat RIA everywhere on trained
    weights: on ``../shared/models/pylm`` (64 x 256 calibration tokens, 48 held-out windows) it is ahead of RIA
    from 40% to 70% sparsity but slightly behind at 30%, and its one pass costs more than one RIA run (see
    ``benchmarks/README.md``). Its knobs: ``alpha`` (RIA's activation
    exponent), ``step_fraction`` (share of a matrix's weights allowed to leave the path per rate evaluation;
    smaller is closer to the exact event-by-event path and costs more), ``correction`` (weight of the input
    correlations in the path's error correction, i.e. the Gram shrunk toward its diagonal: 0 is RIA's order,
    1 the full calibration Gram, which on trained weights removes large weights that only cancel the error of
    small ones; see ``ops.iss_weight_path``), ``target_modules`` / ``exclude_modules`` (regexes, as for
    layer-wise methods).
    """

    method: ClassVar[str] = "spp"

    sparsity: float = 0.5
    budget: str = "params"
    scope: str = "per_group"
    order: str = "first_entry"
    min_keep: int = 1
    groups: tuple[str, ...] = GROUPS
    share_across_heads: bool = True
    lr: float = 1e-3
    kappa: float = 1.0
    lam: float | None = None
    nu: float = 100.0
    coupling: str = "split_lbi"
    adam_bias_correction: bool = True
    record_every: int = 10
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-4
    lr_scheduler: str = "cosine_with_min_lr"
    min_lr: float = 1e-5
    warmup_steps: int = 0
    flops_seq_len: int = 128
    path: str | None = None
    training_free: bool = False
    alpha: float = 0.5
    step_fraction: float = 0.05
    correction: float = 0.05
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_number(owner, "sparsity", self.sparsity, 0.0, 1.0)
        self.sparsity = float(self.sparsity)
        check_choice(owner, "budget", self.budget, BUDGETS)
        check_choice(owner, "scope", self.scope, SCOPES)
        check_choice(owner, "order", self.order, ORDERS)
        check_choice(owner, "coupling", self.coupling, COUPLINGS)
        check_int(owner, "min_keep", self.min_keep, 1)
        check_int(owner, "record_every", self.record_every, 1)
        check_int(owner, "warmup_steps", self.warmup_steps, 0)
        check_int(owner, "flops_seq_len", self.flops_seq_len, 1)
        if isinstance(self.groups, str):
            self.groups = (self.groups,)
        if not isinstance(self.groups, (list, tuple)) or not self.groups:
            raise ValueError(f"{owner}.groups={self.groups!r} must be a non-empty tuple drawn from {GROUPS}.")
        for g in self.groups:
            check_choice(owner, "groups[...]", g, GROUPS)
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"{owner}.groups={self.groups!r} names a group twice.")
        self.groups = tuple(g for g in GROUPS if g in self.groups)  # canonical order
        for name in ("share_across_heads", "adam_bias_correction", "training_free"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r} must be True or False.")
        if self.lam is None:
            self.lam = LAM_DEFAULTS[self.coupling]
        for name in ("lr", "kappa", "lam", "nu"):
            check_number(owner, name, getattr(self, name), 0.0, float("inf"), low_inclusive=False)
        check_number(owner, "weight_decay", self.weight_decay, 0.0, float("inf"))
        check_number(owner, "adam_epsilon", self.adam_epsilon, 0.0, 1.0, low_inclusive=False)
        check_number(owner, "min_lr", self.min_lr, 0.0, float("inf"))
        check_number(owner, "alpha", self.alpha, 0.0, 4.0, high_inclusive=True)
        check_number(owner, "step_fraction", self.step_fraction, 0.0, 1.0, low_inclusive=False, high_inclusive=True)
        check_number(owner, "correction", self.correction, 0.0, 1.0, high_inclusive=True)
        if not isinstance(self.lr_scheduler, str) or not re.fullmatch(r"[a-z_]+", self.lr_scheduler):
            raise ValueError(f"{owner}.lr_scheduler={self.lr_scheduler!r} must be a transformers scheduler name "
                             "such as 'cosine_with_min_lr', 'cosine', 'linear' or 'constant'.")
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ValueError(f"{owner}.path={self.path!r} must be the folder or Hub id of a saved SolutionPath.")
        if self.path is not None and self.training_free:
            raise ValueError(f"{owner}: path={self.path!r} reads a model off a saved solution path and "
                             "training_free=True builds a new one from calibration data; set only one of them.")
        self.target_modules = regex_list(owner, "target_modules", self.target_modules)
        self.exclude_modules = regex_list(owner, "exclude_modules", self.exclude_modules)

    def training_arguments(self, output_dir: str, **overrides: Any):
        """``transformers.TrainingArguments`` carrying this search's optimizer and schedule (``learning_rate=lr``,
        AdamW with ``adam_epsilon``, ``weight_decay``, ``lr_scheduler`` down to ``min_lr``, ``warmup_steps``);
        anything else (batch size, steps, saving) comes from ``overrides``."""
        from transformers import TrainingArguments

        kwargs: dict[str, Any] = dict(output_dir=output_dir, learning_rate=self.lr, weight_decay=self.weight_decay,
                                      adam_epsilon=self.adam_epsilon, lr_scheduler_type=self.lr_scheduler,
                                      warmup_steps=self.warmup_steps, optim="adamw_torch", report_to="none")
        if self.lr_scheduler == "cosine_with_min_lr":
            kwargs["lr_scheduler_kwargs"] = {"min_lr": self.min_lr}
        clash = sorted(k for k in ("learning_rate",) if k in overrides and overrides[k] != self.lr)
        if clash:
            raise ValueError(f"SPPConfig.training_arguments: learning_rate={overrides['learning_rate']!r} differs from "
                             f"SPPConfig.lr={self.lr!r}; set the search learning rate in the config.")
        kwargs.update(overrides)
        return TrainingArguments(**kwargs)
