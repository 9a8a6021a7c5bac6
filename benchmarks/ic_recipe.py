"""Input compensation's training recipe on the shared trained decoder: one row per recipe, in-domain.

    python benchmarks/ic_recipe.py                                   # Wanda 2:4, the recipe grid below
    python benchmarks/ic_recipe.py --method magnitude --setting 0.5 --recipes "lr=0.01" "lr=0.03,pool=256"

The pruned model (``--method`` at ``--setting``, calibrated on 32 x 256 tokens of ``pylm-data/calibration.txt``)
gets a compensation pool trained on random windows of ``calibration.txt`` (KL to the dense model's logits unless
the recipe says otherwise; AdamW, batch 8 x 128) and is evaluated on ``pylm-data/heldout.txt``: every
``--eval-every`` steps the held-out loss on a selection slice (windows 48-63) picks the best pool (the zero
pool, i.e. the pruned model, included); the table gives the perplexity over windows 0-47 of the best pool and of
the last one, and the share of the log-perplexity gap to dense it closes. The loop is the one ``Trainer`` runs
(AdamW, linear warmup, cosine decay), written out so a grid fits in minutes. Prints a table; never asserts.

Recipe keys: lr, steps, warmup (steps), pool (entries), tau (temperature; "auto" = the config default), loss
(kd_kl | task | kd_kl+task), kdT (distillation temperature), norm (0/1: normalise the query).
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
from hf_prune.engine.report import format_table  # noqa: E402
from hf_prune.evaluation import perplexity_windows  # noqa: E402

METHODS = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}
DEFAULTS = {"lr": 1e-2, "steps": 300, "warmup": 0, "pool": 64, "tau": "auto", "loss": "kd_kl", "kdT": 1.0, "norm": 1}


def parse_recipe(text: str) -> dict:
    recipe = dict(DEFAULTS)
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        if key not in DEFAULTS:
            raise SystemExit(f"unknown recipe key {key!r}; choose from {sorted(DEFAULTS)}")
        recipe[key] = value if key in ("loss", "tau") and value in ("auto", "kd_kl", "task", "kd_kl+task") \
            else type(DEFAULTS[key] if key != "tau" else 1.0)(value)
    return recipe


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, batch: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i: i + batch]
        out = model(input_ids=ids, labels=ids) if not isinstance(model, InputCompensatedModel) else \
            model.base_model(input_ids=ids, labels=ids)
        total += float(out.loss) * len(ids)
        count += len(ids)
    return total / count


def train(pruned, dense, recipe: dict, train_windows, select, evaluate, args) -> dict:
    loss = {"kd_kl": "kd_kl", "task": "task", "kd_kl+task": {"kd_kl": 1.0, "task": 1.0}}[recipe["loss"]]
    config = InputCompensationConfig(pool_size=recipe["pool"], loss=loss, kd_temperature=recipe["kdT"],
                                     temperature=None if recipe["tau"] == "auto" else float(recipe["tau"]),
                                     normalize_query=bool(recipe["norm"]))
    ic = InputCompensatedModel(copy.deepcopy(pruned), config, teacher=dense)
    ic.freeze_base_()
    params = [p for p in ic.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.0)
    steps, warm = recipe["steps"], recipe["warmup"]

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(0)
    best = (mean_loss(ic, select), 0, {k: v.detach().clone() for k, v in ic.pool.state_dict().items()})
    start = time.perf_counter()
    for step in range(steps):
        ic.train()
        ids = train_windows[torch.randint(len(train_windows), (args.batch_size,), generator=gen)]
        out = ic(input_ids=ids, labels=ids if "task" in recipe["loss"] else None)
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            value = mean_loss(ic, select)
            if value < best[0]:
                best = (value, step + 1, {k: v.detach().clone() for k, v in ic.pool.state_dict().items()})
    seconds = time.perf_counter() - start
    last = mean_loss(ic, evaluate)
    ic.pool.load_state_dict(best[2])
    return {"best": mean_loss(ic, evaluate), "last": last, "best_step": best[1], "seconds": seconds,
            "params": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=PYLM)
    parser.add_argument("--calibration", default=f"{PYLM_DATA}/calibration.txt")
    parser.add_argument("--eval", default=f"{PYLM_DATA}/heldout.txt")
    parser.add_argument("--method", default="wanda", choices=list(METHODS))
    parser.add_argument("--setting", default="2:4", help="a sparsity (0.5) or an N:M pattern (2:4)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-seq-len", type=int, default=128, help="tokens per training window")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--recipes", nargs="+", default=["", "lr=0.03", "lr=0.1", "lr=0.03,pool=256",
                                                         "lr=0.03,tau=1", "lr=0.03,loss=task"])
    args = parser.parse_args()
    torch.manual_seed(0)
    base = Pruner.from_pretrained(args.model, dtype=torch.float32)
    dense, tok = copy.deepcopy(base.model).eval(), base.tokenizer
    setting = {"pattern": args.setting} if ":" in args.setting else {"sparsity": float(args.setting)}
    base.prune(METHODS[args.method](calibration=CalibrationConfig(dataset=args.calibration, num_samples=32,
                                                                  seq_len=args.seq_len), **setting), progress=False)
    pruned = base.model.eval()
    train_windows, _ = perplexity_windows(tok, args.calibration, seq_len=args.train_seq_len)
    held, _ = perplexity_windows(tok, args.eval, seq_len=args.seq_len)
    evaluate, select = held[:48], held[48:64]
    d, p = mean_loss(dense, evaluate), mean_loss(pruned, evaluate)
    print(f"{args.model}: {args.method} {args.setting}; held-out windows 0-47 of {args.eval}: dense ppl "
          f"{math.exp(d):.3f}, pruned {math.exp(p):.3f}; train windows: {len(train_windows)} of {args.calibration}\n")
    rows = []
    for text in args.recipes:
        recipe = parse_recipe(text)
        r = train(pruned, dense, recipe, train_windows, select, evaluate, args)
        rows.append([text or "(defaults)", f"{r['params']:,}", f"{math.exp(r['best']):.3f}", str(r["best_step"]),
                     f"{(p - r['best']) / (p - d):.1%}", f"{math.exp(r['last']):.3f}",
                     f"{(p - r['last']) / (p - d):.1%}", f"{r['seconds']:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    print()
    print(format_table(rows, ["recipe", "pool params", "best ppl", "best step", "gap closed", "last ppl",
                              "last gap closed", "train s"]))


if __name__ == "__main__":
    main()
