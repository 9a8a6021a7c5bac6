"""``SolutionPathCallback``: drives SPP's inverse-scale-space dynamics inside an ordinary ``Trainer.train()``.

    from hf_prune import SPPConfig
    from hf_prune.callbacks import SolutionPathCallback
    from hf_prune.methods.spp import attach_masks

    config = SPPConfig(lam=0.5)
    attach_masks(model, config)                         # backbone frozen; only the masks train
    trainer = Trainer(model=model, args=config.training_arguments("out", max_steps=500),
                      train_dataset=data, callbacks=[SolutionPathCallback()])
    trainer.train()                                     # writes out/solution_path/ (main process only)

After every optimizer step (the masks' AdamW step on the task loss) it updates z and Gamma in float32 and records
each entry's first-entry time on the path time (the cumulative learning rate); every ``record_every`` steps it
counts the entries that are on (the released code's ``step_record``). With ``coupling="split_lbi"`` it adds the
coupling gradient (alpha - Gamma) / nu before each step.

The path state is a set of parameters and buffers of the masks module attached to the model, so Trainer
checkpoints carry it in ``model.safetensors`` and ``resume_from_checkpoint`` restores it exactly. Every rank
applies the same update to the same (all-reduced) masks, so under ``accelerate launch`` all ranks hold the same
path; only the main process writes it.
"""

from __future__ import annotations

import math
import os
import warnings

from transformers import TrainerCallback

from ...atomic import check_output_dir
from ...engine import distributed
from .masks import SPPMasks

PATH_FOLDER = "solution_path"


class SolutionPathCallback(TrainerCallback):
    """Records SPP's solution path during ``Trainer.train()``; knobs live in the ``SPPConfig`` given to
    ``attach_masks``. After training, ``callback.path`` is the ``SolutionPath`` (also saved to
    ``<output_dir>/solution_path`` by the main process)."""

    def __init__(self):
        self.masks: SPPMasks | None = None
        self.path = None

    # ---- checks before the first step ------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if distributed.fsdp_in_use(args, model):
            raise ValueError(
                "SolutionPathCallback cannot run SPP's search under FSDP: after every step the path update reads and "
                "writes every mask whole (z, Gamma, first-entry times), and FSDP would shard the masks with the model. "
                "Run the search under DDP (accelerate launch / torchrun without FSDP; tested: every process holds the "
                "same path): the backbone is frozen during the search, so each process needs only the model's "
                "inference memory plus the masks and their optimizer state.")
        masks = SPPMasks.find(model) if model is not None else None
        if masks is None:
            raise ValueError("SolutionPathCallback: the model carries no SPP masks. Call "
                             "hf_prune.methods.spp.attach_masks(model, SPPConfig(...)) before creating the Trainer.")
        # the path's folder must be one the save at the end may replace: found now, not after training
        check_output_dir(os.path.join(args.output_dir, PATH_FOLDER), overwrite=True)
        config = masks.config
        if not math.isclose(args.learning_rate, config.lr, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(f"SolutionPathCallback: TrainingArguments.learning_rate={args.learning_rate!r} differs "
                             f"from SPPConfig.lr={config.lr!r}; build the arguments with "
                             "config.training_arguments(...).")
        mine = {id(p) for p in masks.alphas()}
        extra = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in mine]
        if extra:
            raise ValueError(f"SolutionPathCallback: the backbone must stay frozen during the search, but {len(extra)} "
                             f"other parameters require gradients (e.g. {extra[0]}).")
        if optimizer is not None:
            groups = [g for g in optimizer.param_groups if any(id(p) in mine for p in g["params"])]
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not mine <= held:
                raise ValueError("SolutionPathCallback: the optimizer does not hold the masks; attach the masks before "
                                 "creating the Trainer (or its optimizer).")
            if len({g["lr"] for g in groups}) != 1:
                raise ValueError("SolutionPathCallback: the masks sit in optimizer groups with different learning "
                                 "rates; the path time needs one.")
            if config.adam_bias_correction and "betas" not in groups[0]:
                raise ValueError("SPPConfig.adam_bias_correction=True needs an Adam-type optimizer (betas); use "
                                 "optim='adamw_torch' or set adam_bias_correction=False.")
        if config.coupling == "split_lbi" and getattr(args, "fp16", False):
            raise ValueError("SPPConfig.coupling='split_lbi' adds its coupling gradient in float32 and cannot run "
                             "under fp16 gradient scaling; use bf16=True or full precision.")
        self.masks = masks

    # ---- the dynamics ------------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.masks is not None and self.masks.config.coupling == "split_lbi":
            self.masks.add_coupling_gradients()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        masks = self.masks
        if masks is None or optimizer is None or getattr(optimizer, "step_was_skipped", False):
            return
        first = masks.alphas()[0]
        group = next(g for g in optimizer.param_groups if any(p is first for p in g["params"]))
        step_state = optimizer.state.get(first, {}).get("step", int(masks.steps) + 1)
        beta1 = group.get("betas", (0.0, 0.0))[0]
        record = (int(masks.steps) + 1) % masks.config.record_every == 0
        masks.advance(float(group["lr"]), int(step_state), float(beta1), record)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.masks is None:
            return
        self.path = self.masks.solution_path(model)
        empty = self.path.empty_warning()
        if empty and state.is_world_process_zero:
            warnings.warn(f"SPP search ended: {empty}", stacklevel=2)
        if state.is_world_process_zero:
            # the callback's own folder under the Trainer's output_dir: a later run into that output_dir (a
            # resumed one) replaces the path an earlier run saved there, as the Trainer replaces its own files
            self.path.save_pretrained(os.path.join(args.output_dir, PATH_FOLDER), overwrite=True)
