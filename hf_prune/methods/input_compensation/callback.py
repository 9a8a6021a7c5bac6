"""``InputCompensationCallback``: trains an ``InputCompensatedModel`` through ``transformers.Trainer``.

- ``on_train_begin``: checks the loss can be computed (teacher attached for KD/MSE) and freezes the base, so only
  the pool trains (or, with ``train_base="retained"``, the pool and the kept weights of the pruned Linears);
- ``on_pre_optimizer_step`` / ``on_optimizer_step`` (``train_base="retained"``): the pruned model's
  ``hf_prune.masks.WeightMasks`` zero the gradients of pruned weights before the step, then clean the optimizer
  moments at pruned positions and re-apply the masks after it, so every pruned weight stays exactly zero
  (N:M groups intact);
- ``on_evaluate`` / ``on_train_end`` (``InputCompensationConfig.keep_best``): remembers the trainable tensors
  at the lowest ``eval_loss`` and restores them when training ends (``ic.kept`` says which step won);
- ``on_log``: adds ``ic_delta_ratio`` (‖Δx‖/‖x‖) and ``ic_attention_entropy`` of the pool since the last log;
- ``on_save``: writes ``ic_config.json`` + ``ic_pool.safetensors`` into each checkpoint folder, so any checkpoint
  reloads with ``InputCompensatedModel.from_pretrained(base, checkpoint)``.

The callback has no knobs: they live in ``InputCompensationConfig``.
"""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from ...engine import distributed
from ...errors import HFPruneError
from .model import InputCompensatedModel

logger = logging.getLogger(__name__)


def _compensated(model):
    inner = model
    for _ in range(4):  # DDP / accelerate wrappers keep the model in .module
        if isinstance(inner, InputCompensatedModel):
            return inner
        inner = getattr(inner, "module", None)
        if inner is None:
            break
    raise TypeError(f"InputCompensationCallback needs Trainer(model=InputCompensatedModel(...)), got "
                    f"{type(model).__name__}; wrap the pruned model first.")


class InputCompensationCallback(TrainerCallback):
    """Keeps an input-compensation run honest: frozen base (or exact masks), pool statistics in the logs."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        ic = _compensated(model)
        if ic.weight_masks is not None and distributed.fsdp_in_use(args, model):
            raise ValueError(
                "InputCompensationConfig(train_base='retained') keeps the pruned weights at zero with their masks, "
                "which cannot work under FSDP: FSDP shards every weight across the processes, so no process holds the "
                "whole weight a mask covers. Train under DDP (tested), or with train_base=False (only the pool trains; "
                "the base keeps its zeros without masks).")
        ic.check_ready_to_train()
        ic.freeze_base_()
        if ic.weight_masks is not None:
            ic.weight_masks.apply_(ic.base_model)
        ic.pop_statistics()
        ic._callback_attached = True
        self._best = None
        self._training = True
        ic.kept = None
        if ic.ic_config.keep_best and (str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no"
                                       or not getattr(args, "eval_on_start", False)):
            logger.warning("InputCompensationConfig.keep_best needs evaluation from step 0 (eval_strategy='steps', "
                           "eval_on_start=True and an eval_dataset with labels; config.training_arguments(...) "
                           "sets the first two). Without it the best pool is chosen among the evaluations that run, "
                           "or the last pool is kept.")
        logger.info("input compensation: %d trainable parameters (%d in the pool)", ic.trainable_parameters(),
                    sum(p.numel() for p in ic.pool.parameters()))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        ic = _compensated(model)
        if ic.weight_masks is not None:
            ic.weight_masks.mask_grads_(ic.base_model)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        ic = _compensated(model)
        if ic.weight_masks is not None:
            if optimizer is not None:
                ic.weight_masks.clean_optimizer_(optimizer, ic.base_model)
            ic.weight_masks.apply_(ic.base_model)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        ic = _compensated(model)
        if not (ic.ic_config.keep_best and getattr(self, "_training", False)):
            return
        value = (metrics or {}).get("eval_loss")
        if value is None:
            raise HFPruneError("InputCompensationConfig.keep_best picks the pool by eval_loss, but the evaluation "
                               "returned none: give the eval_dataset a 'labels' column (e.g. labels = input_ids) so "
                               "the IC loss is computed on it, or set keep_best=False.")
        if self._best is None or value < self._best[0]:
            self._best = (float(value), state.global_step,
                          {k: v.detach().clone() for k, v in ic.state_dict().items()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        ic = _compensated(model)
        ic._callback_attached = False
        self._training = False
        best = getattr(self, "_best", None)
        if ic.ic_config.keep_best and best is not None:
            ic.load_state_dict(best[2])
            ic.kept = {"step": best[1], "eval_loss": best[0], "last_step": state.global_step}
            logger.info("input compensation: kept the pool of step %d (eval_loss %.5f)", best[1], best[0])
        self._best = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        stats = _compensated(model).pop_statistics()
        if not stats or logs is None:
            return
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):  # the Trainer's folder: the pool's two files join its own
            _compensated(model).write_files(folder)
