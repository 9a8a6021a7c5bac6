"""``InputCompensationConfig``: a learned compensation pool that recovers, in input space, what a pruner removed.

Input compensation (IC) is not a one-shot pruner: it trains a small pool (keys ``K``, values ``V``) against the
dense model *after* any pruner of this library, through ``transformers.Trainer``. The config is registered
like every method (so ``PrunerConfig.from_dict`` reads ``ic_config.json`` back into this class), but
``Pruner.prune`` refuses it with directions: wrap the pruned model in ``InputCompensatedModel`` and train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ...checks import check_choice, check_int, check_number
from ...config import PrunerConfig

ENCODERS = ("embedding", "identity")  # or a dotted module path of the pruned model
INJECTS = ("auto", "inputs_embeds", "pixel_values")
QUERY_POOLS = ("auto", "none", "mean")
LOSSES = ("kd_kl", "mse", "task")
TEACHER_LOSSES = ("kd_kl", "mse")


def loss_weights(loss: str | dict) -> dict[str, float]:
    """``{"kd_kl": 1.0}`` for ``"kd_kl"``; a dict mixture is returned without its zero-weight terms."""
    if isinstance(loss, str):
        return {loss: 1.0}
    return {name: float(weight) for name, weight in loss.items() if weight}


@dataclass(kw_only=True)
class InputCompensationConfig(PrunerConfig):
    """Input compensation (IC): a compensation pool trained after pruning; foldable into the embeddings of LMs.

    - ``pool_size``: number of pool entries ``m`` (keys [m, d_q] and values [m, d_x]).
    - ``temperature``: softmax temperature τ of the pool attention (``None``: ``sqrt(d_q) / 8``, so the
      initial logits have standard deviation 8; see ``ops.default_temperature``).
    - ``normalize_query``: divide the query by its RMS before scoring (keeps τ meaningful whatever the scale
      of the embeddings; our choice, the paper's code is not public).
    - ``encoder``: where the query comes from: ``"embedding"`` (the token's input embedding for LMs, the
      patch-embedding convolution for vision towers), ``"identity"`` (the input itself), or the dotted path
      of a (frozen) module of the pruned model, e.g. ``"vision_model"`` for the whole pruned image encoder.
    - ``inject``: what the compensation is added to: ``"inputs_embeds"`` (text), ``"pixel_values"`` (images),
      ``"auto"`` (pixels when the model has a vision tower, else input embeddings).
    - ``query_pool``: ``"none"`` (one query per token; foldable), ``"mean"`` (mean over the sequence or the
      patches: one compensation per input), ``"auto"`` (per token for text, mean over patches for images).
      Decoder LMs must use ``"none"``: a pooled context would leak future tokens and break the KV cache.
    - ``loss``: ``"kd_kl"`` (KL to the dense teacher's logits), ``"mse"`` (MSE to the teacher's ``feature``),
      ``"task"`` (the model's own loss on ``labels``) or a mixture ``{"kd_kl": 1.0, "task": 0.5}``.
    - ``kd_temperature``: temperature of the distillation softmax (the KL is scaled by its square).
    - ``feature``: the output field the ``"mse"`` loss compares (default: the first of ``logits``,
      ``logits_per_image``, ``image_embeds``, ``pooler_output``, ``last_hidden_state`` present).
    - ``train_base``: ``False`` (the pruned model stays frozen) or ``"retained"`` (its pruned Linear weights
      train too, with every pruned position held at exactly zero by ``InputCompensationCallback``).
    - ``init_seed``: seed of the key initialisation (keys ~ N(0, 1); values start at 0).

    The training recipe (``training_arguments(output_dir, ...)`` builds the matching ``TrainingArguments``):

    - ``lr``, ``steps``, ``warmup_steps``, ``lr_scheduler``: AdamW on the pool (no weight decay);
    - ``keep_best``: ``InputCompensationCallback`` keeps the pool with the lowest ``eval_loss`` seen while
      training (the evaluation at step 0 is the pruned model itself, so the result is never worse than pruning
      alone on that data) and restores it at the end. It needs an ``eval_dataset`` whose rows carry ``labels``
      (the loss is then the configured IC loss on held-out text); ``training_arguments`` turns on evaluation
      every ``eval_steps`` steps and at the start.

    ``calibration`` (inherited) is unused: IC trains on whatever dataset you hand to ``Trainer``.
    """

    method: ClassVar[str] = "input_compensation"

    pool_size: int = 64
    temperature: float | None = None
    normalize_query: bool = True
    encoder: str = "embedding"
    inject: str = "auto"
    query_pool: str = "auto"
    loss: Any = "kd_kl"
    kd_temperature: float = 1.0
    feature: str | None = None
    train_base: Any = False
    init_seed: int = 0
    lr: float = 3e-3
    steps: int = 300
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    keep_best: bool = True
    eval_steps: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_int(owner, "pool_size", self.pool_size, 1)
        if self.temperature is not None:
            check_number(owner, "temperature", self.temperature, 0.0, float("inf"), low_inclusive=False)
            self.temperature = float(self.temperature)
        if not isinstance(self.normalize_query, bool):
            raise ValueError(f"{owner}.normalize_query={self.normalize_query!r} must be True or False.")
        if not isinstance(self.encoder, str) or not self.encoder.strip():
            raise ValueError(f"{owner}.encoder={self.encoder!r} must be 'embedding', 'identity' or the dotted path "
                             "of a module of the pruned model (e.g. 'vision_model.embeddings.patch_embedding').")
        check_choice(owner, "inject", self.inject, INJECTS)
        check_choice(owner, "query_pool", self.query_pool, QUERY_POOLS)
        if isinstance(self.loss, str):
            check_choice(owner, "loss", self.loss, LOSSES)
        elif isinstance(self.loss, dict):
            if not self.loss:
                raise ValueError(f"{owner}.loss is an empty dict; give weights such as {{'kd_kl': 1.0, 'task': 0.5}}.")
            for name, weight in self.loss.items():
                check_choice(owner, "loss key", name, LOSSES)
                check_number(owner, f"loss[{name!r}]", weight, 0.0, float("inf"))
            if not any(self.loss.values()):
                raise ValueError(f"{owner}.loss={self.loss!r} gives every term weight 0; at least one must be > 0.")
            self.loss = {str(k): float(v) for k, v in self.loss.items()}
        else:
            raise ValueError(f"{owner}.loss={self.loss!r} must be one of {', '.join(map(repr, LOSSES))} or a dict "
                             "of weights such as {'kd_kl': 1.0, 'task': 0.5}.")
        check_number(owner, "kd_temperature", self.kd_temperature, 0.0, float("inf"), low_inclusive=False)
        self.kd_temperature = float(self.kd_temperature)
        if self.feature is not None and (not isinstance(self.feature, str) or not self.feature):
            raise ValueError(f"{owner}.feature={self.feature!r} must be None or the name of an output field, "
                             "e.g. 'image_embeds'.")
        if self.train_base is True:
            raise ValueError(f"{owner}.train_base=True would let training revive the pruned weights; use "
                             "train_base='retained' (only the kept weights train, pruned ones stay exactly zero) "
                             "or False (the pruned model stays frozen).")
        if self.train_base not in (False, None, "retained"):
            raise ValueError(f"{owner}.train_base={self.train_base!r} is not supported; choose False or 'retained'.")
        self.train_base = self.train_base or False
        check_int(owner, "init_seed", self.init_seed, 0)
        check_number(owner, "lr", self.lr, 0.0, float("inf"), low_inclusive=False)
        check_int(owner, "steps", self.steps, 1)
        check_int(owner, "warmup_steps", self.warmup_steps, 0)
        check_int(owner, "eval_steps", self.eval_steps, 1)
        if not isinstance(self.lr_scheduler, str) or not re.fullmatch(r"[a-z_]+", self.lr_scheduler):
            raise ValueError(f"{owner}.lr_scheduler={self.lr_scheduler!r} must be a transformers scheduler name such "
                             "as 'cosine', 'linear' or 'constant'.")
        if not isinstance(self.keep_best, bool):
            raise ValueError(f"{owner}.keep_best={self.keep_best!r} must be True or False.")

    def training_arguments(self, output_dir: str, **overrides: Any):
        """``transformers.TrainingArguments`` carrying this recipe: ``learning_rate=lr``, ``max_steps=steps``,
        ``lr_scheduler``, ``warmup_steps``, no weight decay, no checkpoints; with ``keep_best``, evaluation every
        ``eval_steps`` steps and at step 0 (pass ``Trainer(eval_dataset=...)`` with ``labels``). Anything else
        (batch size, device, logging) comes from ``overrides``; a learning rate or step count that differs from
        the config's is refused (set it in the config, where the card and ``ic_config.json`` record it)."""
        from transformers import TrainingArguments

        kwargs: dict[str, Any] = dict(output_dir=output_dir, learning_rate=self.lr, max_steps=self.steps,
                                      lr_scheduler_type=self.lr_scheduler, warmup_steps=self.warmup_steps,
                                      weight_decay=0.0, optim="adamw_torch", save_strategy="no", report_to="none")
        if self.keep_best:
            kwargs.update(eval_strategy="steps", eval_steps=self.eval_steps, eval_on_start=True)
        for key, mine in (("learning_rate", self.lr), ("max_steps", self.steps)):
            if key in overrides and overrides[key] != mine:
                raise ValueError(f"InputCompensationConfig.training_arguments: {key}={overrides[key]!r} differs from "
                                 f"the config's {mine!r}; set lr/steps in InputCompensationConfig.")
        kwargs.update(overrides)
        return TrainingArguments(**kwargs)

    @property
    def loss_terms(self) -> dict[str, float]:
        return loss_weights(self.loss)

    @property
    def needs_teacher(self) -> bool:
        return any(name in TEACHER_LOSSES for name in self.loss_terms)


# what Pruner.prune says instead of running IC: it needs the dense model as a teacher (prune changes its model in
# place, so it has none) and a training loop with its optimizer, schedule and data (transformers.Trainer owns those)
HOW_TO_RUN = (
    "input compensation is trained, not applied in one shot: prune first (e.g. pruner.prune(WandaConfig(...))), "
    "then wrap the pruned model, ic = InputCompensatedModel(pruner.model, InputCompensationConfig(...), "
    "teacher=dense_model), and train it with transformers.Trainer(model=ic, ..., "
    "callbacks=[hf_prune.callbacks.InputCompensationCallback()]); for language models ic.merge_and_unload() "
    "then folds the pool into the embedding table. The model was not changed.")
