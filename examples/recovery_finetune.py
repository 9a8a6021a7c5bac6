"""Recovery fine-tuning after pruning, two ways, with the sparsity kept exact:

1. full fine-tuning with ``transformers.Trainer`` + ``hf_prune.callbacks.SparsityPreservingCallback`` (pruned
   weights stay exactly zero through AdamW with weight decay; N:M groups stay intact);
2. LoRA with PEFT on the frozen pruned model, merged back with ``hf_prune.training.merge_lora_keep_sparsity``
   (PEFT's plain merge would fill every pruned position with the dense LoRA update; re-masking after the merge
   keeps the zeros but drops the part of the update that fell on them, which the script reports).

    python examples/recovery_finetune.py                      # magnitude 70%, the shared trained decoder
    python examples/recovery_finetune.py --pattern 2:4 --steps 100 --output out/recovered [--push-to REPO]
"""

from __future__ import annotations

import copy

import torch
import transformers as T
from example_utils import dense_perplexity, load, parser, publish, sparsity_arg, training_windows

from hf_prune import MagnitudeConfig
from hf_prune.callbacks import SparsityPreservingCallback
from hf_prune.evaluation import perplexity
from hf_prune.training.lora import merge_lora_keep_sparsity
from hf_prune.training.weight_masks import WeightMasks


def training_args(args, lr: float, weight_decay: float) -> T.TrainingArguments:
    return T.TrainingArguments(output_dir=args.work_dir, max_steps=args.steps, per_device_train_batch_size=8,
                               learning_rate=lr, lr_scheduler_type="constant", weight_decay=weight_decay,
                               max_grad_norm=1.0, logging_steps=max(1, args.steps // 4), save_strategy="no",
                               report_to="none", use_cpu=not torch.cuda.is_available(), seed=0, disable_tqdm=True)


def main() -> None:
    p = parser(__doc__, sparsity=0.7)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each fine-tuning run")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of the full fine-tuning (3e-3 wrecked the "
                                                          "shared trained decoder: 13.3 -> 24.8 perplexity)")
    p.add_argument("--lora-lr", type=float, default=5e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--work-dir", default="recovery-runs", help="Trainer's output_dir (nothing is saved there)")
    args = p.parse_args()

    pruner = load(args.model)
    dense = dense_perplexity(pruner, args)
    pruner.prune(MagnitudeConfig(sparsity=sparsity_arg(args), pattern=args.pattern), progress=False)
    masks = WeightMasks.from_model(pruner.model)

    def ppl(model) -> float:
        return perplexity(model, pruner.tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.eval_windows)

    pruned = ppl(pruner.model)
    lora_model = copy.deepcopy(pruner.model)  # the second recipe starts from the same pruned weights
    windows = training_windows(pruner.tokenizer, args.seq_len, 8 * args.steps, args.calibration)
    data = [{"input_ids": row, "labels": row} for row in windows]

    # 1. full fine-tuning, every pruned weight held at zero
    keeper = SparsityPreservingCallback()
    T.Trainer(model=pruner.model, args=training_args(args, args.lr, 0.1), train_dataset=data,
              callbacks=[keeper]).train()
    summary = keeper.summary()
    print(f"full fine-tuning: {summary['steps']} steps, {summary['pruned_weights_kept_zero']} pruned weights, "
          f"{masks.violations(pruner.model)} of them non-zero after training")

    # 2. LoRA on the frozen pruned model, merged with the sparsity pattern kept
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(lora_model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    T.Trainer(model=lora, args=training_args(args, args.lora_lr, 0.0), train_dataset=data).train()
    adapter = ppl(lora)
    merge = merge_lora_keep_sparsity(lora, masks)
    merged = ppl(merge.model)
    print(f"LoRA merge: {merge.masked_modules} modules re-masked, {100 * merge.dropped_fraction:.1f}% of the LoRA "
          f"update's squared norm fell on pruned weights and was dropped; "
          f"{masks.violations(merge.model)} pruned weights non-zero after the merge")

    print(f"\nperplexity ({args.eval}, held out, {args.eval_windows} x {args.seq_len} tokens)")
    for name, value in (("dense", dense), (f"pruned ({pruner.last_result.report['pattern']}, "
                                           f"{pruner.last_result.sparsity:.2f})", pruned),
                        ("+ full fine-tuning (masks kept)", ppl(pruner.model)), ("+ LoRA adapter (unmerged)", adapter),
                        ("+ LoRA merged, re-masked", merged)):
        print(f"  {name:<34} {value:8.3f}")
    # the fine-tuned model is pruner.model: its card records the pruning and the fine-tuning
    publish(pruner, args, dense, finetuning=summary, label="pruned + fine-tuned")


if __name__ == "__main__":
    main()
