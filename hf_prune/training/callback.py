"""``SparsityPreservingCallback``: recovery fine-tuning of a pruned model with ``transformers.Trainer`` that
keeps every pruned weight exactly zero (and so every N:M group intact)."""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from ..engine import distributed
from .weight_masks import WeightMasks


class SparsityPreservingCallback(TrainerCallback):
    """Keeps the pruned weights of a model at exactly zero through ``Trainer`` fine-tuning.

    Built on ``hf_prune.masks.WeightMasks``: at the start of training it takes the masks of the pruned Linear
    weights from the model's zeros (or uses ``masks`` if given, e.g. ``WeightMasks.from_model(model)`` taken
    before anything touched the weights), then

    - masks each gradient as soon as backward has accumulated it, so gradient clipping and the logged
      ``grad_norm`` see only the weights that really train, and again before the optimizer step;
    - after every optimizer step, zeroes the optimizer state (AdamW's moments, momentum buffers) at pruned
      positions and re-applies the masks, so neither weight decay nor momentum can revive a pruned weight.

    Works with a PEFT-wrapped model (LoRA: the frozen base keeps its zeros; merge with
    ``hf_prune.recovery.merge_lora_keep_sparsity``) and through DDP. ``summary()`` after training describes
    the run for the model card (``Pruner.save_pretrained(finetuning=callback.summary())``).
    """

    def __init__(self, masks: WeightMasks | None = None):
        if masks is not None and not isinstance(masks, WeightMasks):
            raise TypeError(f"masks must be a hf_prune.masks.WeightMasks (or None to take them from the model's "
                            f"zeros when training starts), got {type(masks).__name__}.")
        self.masks = masks
        self._hooks: list[Any] = []
        self._start_step = 0
        self._summary: dict | None = None

    # ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SparsityPreservingCallback needs the model; use it through transformers.Trainer.")
        if distributed.fsdp_in_use(args, model):
            raise ValueError(
                "SparsityPreservingCallback cannot keep pruned weights at zero under FSDP: FSDP shards (flattens) "
                "every weight across the processes, so no process holds the whole weight a mask covers, and neither "
                "the pruned positions nor their optimizer moments can be zeroed. Fine-tune under DDP instead "
                "(accelerate launch / torchrun without FSDP: every process holds the whole model; tested), or train "
                "LoRA adapters on the frozen pruned base without this callback (the base does not change, so it needs "
                "no mask while training): take masks = WeightMasks.from_model(model) before training and merge with "
                "hf_prune.recovery.merge_lora_keep_sparsity(peft_model, masks) once the full weights are gathered.")
        if self.masks is None:
            self.masks = WeightMasks.from_model(model)
        if not self.masks.masks:
            raise ValueError("SparsityPreservingCallback: the model holds no pruned weights (no Linear inside the "
                             "transformer blocks has a zero); prune it first (Pruner.prune) or pass masks=.")
        self.masks.apply_(model)
        self._remove_hooks()
        for param, mask in self.masks.bind(model):
            if param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(_grad_masker(mask)))
        self._start_step = state.global_step
        self._summary = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.masks.mask_grads_(model)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None:
            self.masks.clean_optimizer_(optimizer, model)
        self.masks.apply_(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._remove_hooks()
        if self.masks is None or model is None:
            return
        self.masks.apply_(model)
        trainable = sum(1 for param, _ in self.masks.bind(model) if param.requires_grad)
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        total = sum(m.numel() for m in self.masks.masks.values())
        self._summary = {
            "trainer": "transformers.Trainer",
            "callback": type(self).__name__,
            "steps": state.global_step - self._start_step,
            "epochs": round(state.epoch, 4) if state.epoch is not None else None,
            "learning_rate": args.learning_rate,
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "weight_decay": args.weight_decay,
            # the global batch of one optimizer step: per device x accumulation x processes (DDP)
            "batch_size": (args.per_device_train_batch_size * max(1, args.gradient_accumulation_steps)
                           * max(1, args.world_size)),
            "processes": max(1, args.world_size),
            "max_grad_norm": args.max_grad_norm,
            "masked_modules": len(self.masks.masks),
            "masked_modules_trained": trainable,
            "pruned_weights_kept_zero": total - sum(int(m.sum()) for m in self.masks.masks.values()),
            "pruned_weights_nonzero_after_training": self.masks.violations(model),
            "first_logged_loss": _round(losses[0]) if losses else None,
            "last_logged_loss": _round(losses[-1]) if losses else None,
        }

    def summary(self) -> dict:
        """What the last training run did (for ``Pruner.save_pretrained(finetuning=...)``)."""
        if self._summary is None:
            raise ValueError("SparsityPreservingCallback.summary() is available after trainer.train() finished.")
        return dict(self._summary)

    # ------------------------------------------------------------------------------------------
    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _grad_masker(mask):
    def hook(param) -> None:
        if param.grad is not None:
            param.grad.masked_fill_(~mask, 0)
    return hook


def _round(value: float) -> float:
    return round(value, 4) if math.isfinite(value) else value
