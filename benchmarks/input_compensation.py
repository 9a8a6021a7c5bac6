"""Input compensation (IC) after one-shot pruning, next to LoRA with a comparable number of trainable parameters.

    python benchmarks/input_compensation.py                      # the shared trained decoder ../shared/models/pylm
    python benchmarks/input_compensation.py --methods wanda --settings 2:4 --steps 300
    python benchmarks/input_compensation.py --model toy --seq-len 128   # hf_prune.toy's LLaMA on builtin:python-docs

In-domain protocol on the shared trained decoder: the pruners calibrate on ``pylm-data/calibration.txt``, IC and
LoRA train on random windows of it (``--train-seq-len`` tokens), and perplexity is measured on windows 0-47 of
``pylm-data/heldout.txt`` (never trained on); windows 48-63 of it are the selection data of ``keep_best`` (the
pool with the lowest held-out IC loss is kept, the pruned model included, so IC is never worse than pruning on
that data). For Magnitude, Wanda and SparseGPT at each ``--settings`` entry it prints the held-out perplexity of
- the pruned model alone;
- the pruned model + IC (``InputCompensationConfig``'s default recipe unless overridden, trained with
  transformers.Trainer and InputCompensationCallback, KL to the dense model's logits), measured after
  merge_and_unload() folded the pool into the embedding table (zero overhead; the table also gives the largest
  logit difference to the unfolded model, which should be float rounding), and the share of the log-perplexity
  gap to dense it closes;
- with ``--vp``, the pruned model + VP, the input-independent ablation the reviewers asked about (a pool of one
  entry: the same vector added to every token);
- the pruned model + LoRA (peft) on every Linear inside the blocks with the rank that gives the closest number of
  trainable parameters to IC's, trained the same way (same data, steps, batch, schedule, KL loss; the last
  adapter, no selection). LoRA is reported twice: with the adapter kept separate (the function it learned; its
  B·A products are dense, so it adds r·(in+out) parameters and their FLOPs per layer at inference) and merged
  into the weights then re-masked with the pruning masks (the sparsity is kept, the function changes).
Trainable parameters and training time (wall and process CPU seconds) are printed for each. Never asserts.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pylm_paths import PYLM, PYLM_DATA  # noqa: E402  (this folder is on sys.path when a script here runs)

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
from hf_prune.evaluation import perplexity_windows  # noqa: E402
from hf_prune.methods.input_compensation.ops import kd_kl_loss  # noqa: E402
from hf_prune.training.weight_masks import WeightMasks  # noqa: E402

METHODS = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}
LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_setting(text: str) -> dict:
    return {"pattern": text} if ":" in text else {"sparsity": float(text)}


def training_args(args, output_dir: str, lr: float, ic_config: InputCompensationConfig | None = None):
    from transformers import TrainingArguments

    common = dict(per_device_train_batch_size=args.batch_size, logging_steps=max(1, args.steps // 4),
                  report_to=[], use_cpu=True, disable_tqdm=True, seed=args.seed, data_seed=args.seed)
    if ic_config is not None:  # the config's recipe: lr, steps, schedule, keep_best's evaluation
        return ic_config.training_arguments(output_dir, **common)
    return TrainingArguments(output_dir=output_dir, max_steps=args.steps, learning_rate=lr, lr_scheduler_type="cosine",
                             warmup_steps=0, weight_decay=0.0, save_strategy="no", **common)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def train_ic(args, pruned, dense, data, select, pool_size: int, out: str):
    from transformers import Trainer

    overrides = {k: v for k, v in (("lr", args.ic_lr), ("steps", args.steps), ("temperature", args.temperature))
                 if v is not None}
    config = InputCompensationConfig(pool_size=pool_size, init_seed=args.seed, keep_best=not args.no_keep_best,
                                     eval_steps=args.eval_steps, **overrides)
    ic = InputCompensatedModel(copy.deepcopy(pruned), config, teacher=dense)
    trainer = Trainer(model=ic, args=training_args(args, out, config.lr, config), train_dataset=data,
                      eval_dataset=select, callbacks=[InputCompensationCallback()])
    wall, cpu = timed(trainer.train)
    ic.eval()
    report, trainable = ic.report(), ic.trainable_parameters()  # before merging gives the base back its own flags
    probe = data[:4]["input_ids"]
    with torch.no_grad():
        wrapped = ic(input_ids=torch.tensor(probe)).logits
        merged = ic.merge_and_unload()
        diff = float((merged(input_ids=torch.tensor(probe)).logits - wrapped).abs().max())
    return merged, report, trainable, wall, cpu, diff


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
    parser.add_argument("--model", default=PYLM, help="a causal LM folder or Hub id (default: the shared trained "
                                                       "decoder); 'toy': hf_prune.toy's LLaMA on builtin:python-docs")
    parser.add_argument("--calibration", default=f"{PYLM_DATA}/calibration.txt",
                        help="calibration and training text (in-domain)")
    parser.add_argument("--eval", default=f"{PYLM_DATA}/heldout.txt", help="held-out text")
    parser.add_argument("--toy-size", default="small", choices=["tiny", "small"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=["0.5", "2:4", "0.7"], help="sparsities and/or N:M patterns")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows (Wanda, SparseGPT)")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration and evaluation window")
    parser.add_argument("--train-seq-len", type=int, default=128, help="training window of IC and LoRA")
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--select-windows", type=int, default=16, help="held-out windows for keep_best")
    parser.add_argument("--train-windows", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=None, help="default: InputCompensationConfig.steps")
    parser.add_argument("--eval-steps", type=int, default=InputCompensationConfig.eval_steps)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pool-size", type=int, default=InputCompensationConfig.pool_size)
    parser.add_argument("--temperature", type=float, default=None, help="IC softmax temperature (default sqrt(d)/8)")
    parser.add_argument("--ic-lr", type=float, default=None, help="default: InputCompensationConfig.lr")
    parser.add_argument("--lora-lr", type=float, default=1e-2)
    parser.add_argument("--no-keep-best", action="store_true", help="keep IC's last pool instead of the best")
    parser.add_argument("--vp", action="store_true", help="add the input-independent (one-entry pool) ablation")
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--no-ic", action="store_true",
                        help="skip IC's training (LoRA only, still sized to IC's parameter count): for the LoRA column "
                             "of a pair whose IC row is already measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/hf_prune_ic_bench")
    args = parser.parse_args()
    if args.no_ic and args.no_lora:
        parser.error("--no-ic with --no-lora leaves nothing to train: drop one of them")
    if args.no_ic and args.vp:
        parser.error("--vp is an IC ablation and needs IC: drop --no-ic or --vp")
    args.steps = args.steps or InputCompensationConfig.steps
    args.ic_lr = args.ic_lr or InputCompensationConfig.lr

    from datasets import Dataset
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    if args.model == "toy":
        from hf_prune.toy import toy_causal_lm

        dense, tokenizer = toy_causal_lm(args.toy_size)
        args.calibration = args.eval = "builtin:python-docs"
        label, train_split, eval_split = f"toy LLaMA ({args.toy_size})", "train", "test"
    else:
        base = Pruner.from_pretrained(args.model, dtype=torch.float32)
        dense, tokenizer, label, train_split, eval_split = base.model, base.tokenizer, args.model, "train", "test"
    dense.eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    windows, _ = perplexity_windows(tokenizer, args.calibration, seq_len=args.train_seq_len, split=train_split)
    g = torch.Generator().manual_seed(args.seed)
    train = windows[torch.randperm(len(windows), generator=g)[: args.train_windows]]
    data = Dataset.from_dict({"input_ids": train.tolist()})
    held, _ = perplexity_windows(tokenizer, args.eval, seq_len=args.seq_len, split=eval_split)
    evaluation = held[: args.eval_windows]
    chosen = held[args.eval_windows: args.eval_windows + args.select_windows]
    select = Dataset.from_dict({"input_ids": chosen.tolist(), "labels": chosen.tolist()})

    @torch.no_grad()
    def ppl(model) -> float:
        model.eval()
        total = sum(float(model(input_ids=evaluation[i: i + 8], labels=evaluation[i: i + 8]).loss) * len(
            evaluation[i: i + 8]) for i in range(0, len(evaluation), 8))
        return math.exp(total / len(evaluation))

    cal = CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, dataset=args.calibration,
                            seed=args.seed)
    params = sum(p.numel() for p in dense.parameters())
    dense_ppl = ppl(dense)
    print(f"model: {label}, {params / 1e6:.2f}M parameters, hidden {dense.config.hidden_size}, "
          f"vocab {dense.config.vocab_size}; dense held-out perplexity {dense_ppl:.3f} "
          f"(windows 0-{args.eval_windows - 1} x {args.seq_len} tokens of {args.eval}; keep_best selects on windows "
          f"{args.eval_windows}-{args.eval_windows + args.select_windows - 1})")
    print(f"training: {len(train)} windows of {args.train_seq_len} tokens of {args.calibration}, {args.steps} steps x "
          f"batch {args.batch_size}, cosine schedule, KL to the dense logits; IC lr {args.ic_lr} pool "
          f"{args.pool_size}, LoRA lr {args.lora_lr}; torch threads {torch.get_num_threads()}\n")

    rows = []
    for method in args.methods:
        for setting in args.settings:
            pruned = copy.deepcopy(dense)
            Pruner(pruned, tokenizer).prune(METHODS[method](calibration=cal, **parse_setting(setting)), progress=False)
            masks = WeightMasks.from_model(pruned)  # to re-mask LoRA after merging
            pruned_ppl = ppl(pruned)
            tag = f"{method}-{setting}".replace(":", "of")
            if args.no_ic:  # LoRA's budget is still the pool's size, counted on an untrained pool
                ic_params = InputCompensatedModel(copy.deepcopy(pruned), InputCompensationConfig(
                    pool_size=args.pool_size), teacher=dense).trainable_parameters()
                row = [method, setting, f"{pruned_ppl:.3f}", "-", "-", "-", f"{ic_params:,}", "-", "-", "-"]
            else:
                folded, report, ic_params, ic_wall, ic_cpu, fold_diff = train_ic(
                    args, pruned, dense, data, select, args.pool_size, os.path.join(args.workdir, tag, "ic"))
                ic_ppl = ppl(folded)
                closed = ((math.log(pruned_ppl) - math.log(ic_ppl))
                          / max(1e-12, math.log(pruned_ppl) - math.log(dense_ppl)))
                kept = report["kept"]["step"] if report.get("kept") else "last"
                row = [method, setting, f"{pruned_ppl:.3f}", f"{ic_ppl:.3f}", f"{closed:.1%}", str(kept),
                       f"{ic_params:,}", f"{ic_wall:.0f}/{ic_cpu:.0f}", f"{report['effective_sparsity']:.4f}",
                       f"{fold_diff:.1e}"]
            if args.vp:
                vp, _, vp_params, _, _, _ = train_ic(args, pruned, dense, data, select, 1,
                                                     os.path.join(args.workdir, tag, "vp"))
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
    headers = ["method", "setting", "pruned", "+IC (folded)", "IC gap closed", "IC kept step", "IC params",
               "IC time wall/cpu (s)", "eff. sparsity w/ unfolded IC", "fold max|dlogit|"]
    if args.vp:
        headers.append("+VP (m=1)")
    if not args.no_lora:
        headers += ["+LoRA (separate)", "sparsity after LoRA merge", "+LoRA merged, re-masked", "LoRA r", "LoRA params", "LoRA time wall/cpu (s)"]
    print()
    print(format_table(rows, headers))
    print(f"\ndense perplexity {dense_ppl:.3f}; after merge_and_unload the IC pool costs 0 parameters and 0 FLOPs "
          "(folded into the embedding table).")


if __name__ == "__main__":
    main()
