"""Input Compensation (IC) after a one-shot pruner: a small pool (keys K, values V) learns to add to each token's
input embedding what the pruned weights no longer compute, trained with ``transformers.Trainer`` against the
dense model's logits while every pruned weight stays frozen. For a language model the compensation depends on
the token id only, so ``merge_and_unload()`` folds it into the embedding table: the saved model is a plain
transformers model with zero extra parameters or FLOPs.

    python examples/input_compensation.py                      # Wanda 2:4 on the shared trained decoder, then IC
    python examples/input_compensation.py --pattern unstructured --sparsity 0.6 --output out/wanda-60-ic

The pool trains with ``InputCompensationConfig``'s recipe (lr 3e-3, 300 steps, cosine; ``keep_best`` keeps the
pool with the lowest IC loss on held-out windows that perplexity is not measured on, so the result is never worse
than the pruned model there).
"""

from __future__ import annotations

import copy

import torch
import transformers as T
from example_utils import dense_perplexity, load, parser, sparsity_arg, training_windows

from hf_prune import CalibrationConfig, InputCompensatedModel, InputCompensationConfig, WandaConfig
from hf_prune.callbacks import InputCompensationCallback
from hf_prune.evaluation import perplexity, perplexity_record, perplexity_windows


def main() -> None:
    p = parser(__doc__, pattern="2:4")  # 2:4 loses more than 50% unstructured, so there is more to recover
    p.add_argument("--pool-size", type=int, default=64, help="entries in the compensation pool")
    p.add_argument("--steps", type=int, default=InputCompensationConfig.steps, help="optimizer steps of the pool")
    p.add_argument("--lr", type=float, default=InputCompensationConfig.lr)
    p.add_argument("--select-windows", type=int, default=8, help="held-out windows (after the measured ones) that "
                                                                 "keep_best picks the pool on")
    p.add_argument("--train-windows", type=int, default=512, help="windows of the train split to train on")
    p.add_argument("--work-dir", default="ic-runs", help="Trainer's output_dir (nothing is saved there)")
    args = p.parse_args()

    pruner = load(args.model)
    dense_value = dense_perplexity(pruner, args)
    teacher = copy.deepcopy(pruner.model).eval()
    pruner.prune(WandaConfig(sparsity=sparsity_arg(args), pattern=args.pattern,
                             calibration=CalibrationConfig(dataset=args.calibration, num_samples=args.num_samples,
                                                           seq_len=args.seq_len)),
                 progress=False)

    def ppl(model) -> float:
        return perplexity(model, pruner.tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.eval_windows)

    pruned_value = ppl(pruner.model)
    data = [{"input_ids": row} for row in training_windows(pruner.tokenizer, args.seq_len, args.train_windows,
                                                          args.calibration)]
    held, _ = perplexity_windows(pruner.tokenizer, args.eval, seq_len=args.seq_len)
    select = [{"input_ids": row, "labels": row} for row in held[args.eval_windows: args.eval_windows + args.select_windows]]
    config = InputCompensationConfig(pool_size=args.pool_size, lr=args.lr, steps=args.steps, keep_best=bool(select),
                                     eval_steps=min(InputCompensationConfig.eval_steps, args.steps))
    ic = InputCompensatedModel(pruner.model, config, teacher=teacher)
    trainer = T.Trainer(model=ic, train_dataset=data, eval_dataset=select or None,
                        callbacks=[InputCompensationCallback()],
                        args=config.training_arguments(args.work_dir, per_device_train_batch_size=8,
                                                       logging_steps=max(1, args.steps // 4),
                                                       use_cpu=not torch.cuda.is_available(), seed=0,
                                                       disable_tqdm=True))
    trainer.train()
    ic.eval()
    report, trained = ic.report(), ic.trainable_parameters()
    pruner.model = ic.merge_and_unload()  # the pool folded into the embedding table: a plain transformers model
    record = perplexity_record(pruner.model, pruner.tokenizer, args.eval, seq_len=args.seq_len, dense=dense_value,
                               max_windows=args.eval_windows)
    print(f"perplexity on held-out text: dense {dense_value:.3f} -> pruned {pruned_value:.3f} -> "
          f"pruned + IC (folded) {record['value']:.3f}; the pool trained {trained:,} parameters "
          f"and costs {report['after_merge']['parameters']} after folding; kept the pool of step "
          f"{(report['kept'] or {}).get('step', args.steps)}")
    section = ("Input compensation",
               f"After pruning, an input-compensation pool of {args.pool_size} entries was trained for {args.steps} "
               f"steps (KL to the dense model's logits, pruned weights frozen) and folded into the input "
               f"embedding table with `InputCompensatedModel.merge_and_unload()`: held-out perplexity "
               f"{pruned_value:.3f} before the pool, {record['value']:.3f} after; no extra parameters or FLOPs.")
    if args.output:
        path = pruner.save_pretrained(args.output, evaluations=[record], sections=[section])
        print(f"saved to {path} (model, tokenizer, pruning_config.json, pruning_report.json, picture, README.md)")
    if args.push_to:
        info = pruner.push_to_hub(args.push_to, evaluations=[record], sections=[section])
        print(f"pushed to {info.repo_url}: {info.commit_url}")


if __name__ == "__main__":
    main()
