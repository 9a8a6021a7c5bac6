"""Input compensation (IC) after one-shot pruning, next to LoRA with a comparable number of trainable parameters.

    python benchmarks/input_compensation.py                      # the small toy LLaMA trained on builtin:python-docs
    python benchmarks/input_compensation.py --steps 400 --pool-size 128 --methods wanda --settings 0.6

For Magnitude, Wanda and SparseGPT at 50%, 60% and 2:4 it prints the held-out perplexity of
- the pruned model alone;
- the pruned model + IC (a pool of --pool-size entries trained with transformers.Trainer and
  InputCompensationCallback, KL to the dense model's logits), measured after merge_and_unload() folded the pool
  into the embedding table (zero overhead; the table also gives the largest logit difference to the unfolded
  model, which should be float rounding);
- the pruned model + VP, the input-independent ablation the reviewers asked about (a pool of one entry: the same
  vector added to every token);
- the pruned model + LoRA (peft) on every Linear inside the blocks with the rank that gives the closest number of
  trainable parameters to IC's, trained the same way (same data, steps, batch, schedule, KL loss). LoRA is
  reported twice: with the adapter kept separate (the function it learned; its B·A products are dense, so it
  adds r·(in+out) parameters and their FLOPs per layer at inference) and merged into the weights then
  re-masked with the pruning masks (the sparsity is kept, the function changes).
Trainable parameters and training time (wall and process CPU seconds) are printed for each. Never asserts.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_prune import (  # noqa: E402
    CalibrationConfig,
    InputCompensatedModel,
    InputCompensationConfig,
    MagnitudeConfig,
    Pruner,
    SparseGPTConfig,
    WandaConfig,
)
from hf_prune.callbacks import InputCompensationCallback  # noqa: E402
from hf_prune.engine.report import format_table  # noqa: E402
from hf_prune.evaluation import perplexity, perplexity_windows  # noqa: E402
from hf_prune.methods.input_compensation.ops import kd_kl_loss  # noqa: E402
from hf_prune.training.weight_masks import WeightMasks  # noqa: E402

METHODS = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}
LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_setting(text: str) -> dict:
    return {"pattern": text} if ":" in text else {"sparsity": float(text)}


def training_args(args, output_dir: str, lr: float):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                             learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                             logging_steps=max(1, args.steps // 4), report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=args.seed, data_seed=args.seed)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def train_ic(args, pruned, dense, data, pool_size: int, out: str):
    from transformers import Trainer

    ic = InputCompensatedModel(copy.deepcopy(pruned), InputCompensationConfig(
        pool_size=pool_size, temperature=args.temperature, init_seed=args.seed), teacher=dense)
    trainer = Trainer(model=ic, args=training_args(args, out, args.ic_lr), train_dataset=data,
                      callbacks=[InputCompensationCallback()])
    wall, cpu = timed(trainer.train)
    ic.eval()
    report = ic.report()
    probe = data[:4]["input_ids"]
    with torch.no_grad():
        wrapped = ic(input_ids=torch.tensor(probe)).logits
        merged = ic.merge_and_unload()
        diff = float((merged(input_ids=torch.tensor(probe)).logits - wrapped).abs().max())
    return merged, report, ic.trainable_parameters(), wall, cpu, diff


def lora_rank(model, budget: int) -> tuple[int, int]:
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LINEAR_TARGETS)
    rank = max(1, round(budget / per_rank))
    return rank, rank * per_rank


def train_lora(args, pruned, dense, data, budget: int, out: str):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    class DistillTrainer(Trainer):  # the same KL-to-dense objective IC trains with
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            with torch.no_grad():
                teacher = dense(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
            mask = inputs.get("attention_mask")
            loss = kd_kl_loss(outputs.logits, teacher, 1.0, None if mask is None else mask.bool())
            return (loss, outputs) if return_outputs else loss

    rank, _ = lora_rank(pruned, budget)
    model = get_peft_model(copy.deepcopy(pruned), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                             target_modules=LINEAR_TARGETS))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = DistillTrainer(model=model, args=training_args(args, out, args.lora_lr), train_dataset=data)
    wall, cpu = timed(trainer.train)
    model.eval()
    return model, rank, trainable, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy-size", default="small", choices=["tiny", "small"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=["0.5", "0.6", "2:4"], help="sparsities and/or N:M patterns")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows (Wanda, SparseGPT)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--train-windows", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pool-size", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None, help="IC softmax temperature (default sqrt(d)/8)")
    parser.add_argument("--ic-lr", type=float, default=1e-2)
    parser.add_argument("--lora-lr", type=float, default=1e-2)
    parser.add_argument("--no-vp", action="store_true", help="skip the input-independent (one-entry pool) ablation")
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/hf_prune_ic_bench")
    args = parser.parse_args()

    from datasets import Dataset
    from transformers.utils import logging as hf_logging

    from hf_prune.toy import toy_causal_lm

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    dense, tokenizer = toy_causal_lm(args.toy_size)
    dense.eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    windows, _ = perplexity_windows(tokenizer, "builtin:python-docs", seq_len=args.seq_len, split="train")
    g = torch.Generator().manual_seed(args.seed)
    train = windows[torch.randperm(len(windows), generator=g)[: args.train_windows]]
    data = Dataset.from_dict({"input_ids": train.tolist()})

    def ppl(model) -> float:
        return perplexity(model, tokenizer, "builtin:python-docs", seq_len=args.seq_len,
                          max_windows=args.eval_windows, batch_size=8)

    cal = CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, dataset="builtin:python-docs",
                            seed=args.seed)
    params = sum(p.numel() for p in dense.parameters())
    dense_ppl = ppl(dense)
    print(f"model: toy LLaMA ({args.toy_size}), {params / 1e6:.2f}M parameters, hidden {dense.config.hidden_size}, "
          f"vocab {dense.config.vocab_size}; dense held-out perplexity {dense_ppl:.3f} "
          f"({args.eval_windows} windows x {args.seq_len} tokens, builtin:python-docs test split)")
    print(f"training: {len(train)} windows of {args.seq_len} tokens from the train split, {args.steps} steps x batch "
          f"{args.batch_size}, cosine schedule, KL to the dense logits; IC lr {args.ic_lr}, LoRA lr {args.lora_lr}; "
          f"torch threads {torch.get_num_threads()}\n")

    rows = []
    for method in args.methods:
        for setting in args.settings:
            pruned = copy.deepcopy(dense)
            Pruner(pruned, tokenizer).prune(METHODS[method](calibration=cal, **parse_setting(setting)), progress=False)
            masks = WeightMasks.from_model(pruned)  # to re-mask LoRA after merging
            pruned_ppl = ppl(pruned)
            tag = f"{method}-{setting}".replace(":", "of")
            folded, report, ic_params, ic_wall, ic_cpu, fold_diff = train_ic(
                args, pruned, dense, data, args.pool_size, os.path.join(args.workdir, tag, "ic"))
            ic_ppl = ppl(folded)
            row = [method, setting, f"{pruned_ppl:.3f}", f"{ic_ppl:.3f}", f"{ic_params:,}", f"{ic_wall:.0f}/{ic_cpu:.0f}",
                   f"{report['effective_sparsity']:.4f}", f"{fold_diff:.1e}"]
            if not args.no_vp:
                vp, _, vp_params, _, _, _ = train_ic(args, pruned, dense, data, 1, os.path.join(args.workdir, tag, "vp"))
                row.append(f"{ppl(vp):.3f}")
            if not args.no_lora:
                lora, rank, lora_params, lora_wall, lora_cpu = train_lora(
                    args, pruned, dense, data, ic_params, os.path.join(args.workdir, tag, "lora"))
                separate = ppl(lora)
                merged = lora.merge_and_unload()
                zeros = sum(int((merged.get_parameter(n) == 0).sum()) for n in masks.masks)
                merged_sparsity = zeros / sum(m.numel() for m in masks.masks.values())
                masks.apply_(merged)
                row += [f"{separate:.3f}", f"{merged_sparsity:.2f}", f"{ppl(merged):.3f}", f"{rank}",
                        f"{lora_params:,}", f"{lora_wall:.0f}/{lora_cpu:.0f}"]
            rows.append(row)
            print(" | ".join(row), flush=True)
    headers = ["method", "setting", "pruned", "+IC (folded)", "IC params", "IC time wall/cpu (s)",
               "eff. sparsity w/ unfolded IC", "fold max|dlogit|"]
    if not args.no_vp:
        headers.append("+VP (m=1)")
    if not args.no_lora:
        headers += ["+LoRA (separate)", "sparsity after LoRA merge", "+LoRA merged, re-masked", "LoRA r", "LoRA params", "LoRA time wall/cpu (s)"]
    print()
    print(format_table(rows, headers))
    print(f"\ndense perplexity {dense_ppl:.3f}; after merge_and_unload the IC pool costs 0 parameters and 0 FLOPs "
          "(folded into the embedding table).")


if __name__ == "__main__":
    main()
