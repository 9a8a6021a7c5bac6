"""Solution-path pruning: one search, then every sparsity read off the path, next to baselines run separately at
each sparsity. Prints tables (and a PNG of the path); never asserts.

    python benchmarks/solution_path.py                  # both parts (needs scikit-learn for the digits)
    python benchmarks/solution_path.py --part structured
    python benchmarks/solution_path.py --part llm       # the shared trained decoder ../shared/models/pylm
    python benchmarks/solution_path.py --part llm --model toy --seq-len 128 --eval-windows 64

Part "structured" (SPP with the Trainer callback): a ViT trained here on scikit-learn's 8x8 handwritten digits
(1400 train / 397 held out, offline). One SPP search per coupling (Split LBI, released code) over the masks of
q-k dims, v-o dims and MLP neurons, then 10%...70% of the block parameters read off the path and materialized
(physically smaller). Baselines, run once per sparsity through the block walker with the same units and
per-group budgets: "magnitude-sp" (norm of the weights an entry removes, data-free) and "activation-sp" (weight
norm x activation RMS on the calibration images, each block calibrated on the already pruned blocks).
Columns: held-out accuracy right after pruning (no fine-tuning), parameters, time.

Part "llm" (the training-free variant, ours, experimental): by default the shared trained decoder
../shared/models/pylm, calibrated on pylm-data/calibration.txt and evaluated on pylm-data/heldout.txt (``--model
toy``: hf_prune.toy's LLaMA on builtin:python-docs); one calibration pass builds the unstructured path, every
sparsity is read off it; RIA runs once per sparsity. Columns: held-out perplexity, and time.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_prune import CalibrationConfig, Pruner, RIAConfig, SPPConfig  # noqa: E402
from hf_prune.engine.report import format_table  # noqa: E402
from hf_prune.engine.stats import LinearStats  # noqa: E402
from hf_prune.engine.walker import walk  # noqa: E402

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
from pylm_paths import PYLM, PYLM_DATA  # noqa: E402  (this folder is on sys.path when a script here runs)

TRAIN = 1400


# --------------------------------------------------------------------------------------------------
# part 1: structured SPP on a digits ViT


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0, torch.tensor(data.target)


class Digits(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return TRAIN

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(pixel_values=x[TRAIN:]).logits.argmax(-1) == y[TRAIN:]).float().mean())


def trained_vit(x, y, steps: int, cache: str):
    import transformers as T

    from hf_prune.atomic import atomic_output_dir

    folder = os.path.join(cache, f"vit-digits-{steps}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return T.ViTForImageClassification.from_pretrained(folder)
    torch.manual_seed(0)
    model = T.ViTForImageClassification(T.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64,
                                                    num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                                    num_labels=10))
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, TRAIN, (64,), generator=g)
        model(pixel_values=x[idx], labels=y[idx]).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    with atomic_output_dir(folder) as tmp:
        model.save_pretrained(tmp)
    return model


def spp_search(model, x, y, config: SPPConfig, steps: int, out: str):
    import transformers as T

    from hf_prune.callbacks import SolutionPathCallback
    from hf_prune.methods.spp import SPPMasks, attach_masks

    model = copy.deepcopy(model)
    attach_masks(model, config)
    args = config.training_arguments(out, max_steps=steps, per_device_train_batch_size=64, seed=0, use_cpu=True,
                                     disable_tqdm=True, logging_strategy="no", save_strategy="no")
    callback = SolutionPathCallback()
    start = time.perf_counter()
    T.Trainer(model=model, args=args, train_dataset=Digits(x, y), callbacks=[callback]).train()
    seconds = time.perf_counter() - start
    SPPMasks.find(model).remove(model)
    return callback.path, seconds


class StructuredBaseline:
    """Block processor: score every mask entry of a block, zero the lowest ``sparsity`` of each group (the masked
    model: k rows, v rows, MLP output columns, as SPP's masks act), so the next block is calibrated on it."""

    def __init__(self, model, units, sparsity: float, use_data: bool):
        self.units = {}
        for unit in units:
            self.units.setdefault(unit.block, []).append(unit)
        self.model, self.sparsity, self.use_data = model, sparsity, use_data

    def statistics(self, block_name, block):
        if not self.use_data:
            return {}
        wanted = {}
        for unit in self.units.get(block_name, []):
            if unit.kind == "mlp":
                wanted[unit.module] = (self.model.get_submodule(unit.module), frozenset({"sq_norm"}))
            else:
                wanted[unit.modules["q"]] = (self.model.get_submodule(unit.modules["q"]), frozenset({"gram"}))
                wanted[unit.modules["o"]] = (self.model.get_submodule(unit.modules["o"]), frozenset({"sq_norm"}))
        return wanted

    def _scores(self, unit, stats: dict[str, LinearStats]) -> torch.Tensor:
        get = self.model.get_submodule
        if unit.kind == "mlp":
            out = get(unit.modules["output"]).weight.float()
            score = out.norm(dim=0) ** 2 + sum(get(n).weight.float().norm(dim=1) ** 2 for n in unit.modules["inputs"])
            score = score.sqrt()
            if self.use_data:
                score = out.norm(dim=0) * stats[unit.module].col_sq_mean.sqrt()
            return score
        heads, kv, hd, gs = unit.heads, unit.kv_heads, unit.head_dim, unit.heads // unit.kv_heads
        q, k, v, o = (get(unit.modules[n]) for n in ("q", "k", "v", "o"))
        if unit.kind == "qk":
            if self.use_data:  # E[(w.x + b)^2] ~ w^T G w + b^2 for every q and k row
                gram = stats[unit.modules["q"]].gram

                def energy(lin):
                    w = lin.weight.float()
                    e = ((w @ gram) * w).sum(1)
                    return e + (lin.bias.float() ** 2 if lin.bias is not None else 0)
                qe, ke = energy(q).view(heads, hd), energy(k).view(kv, hd)
                score = (qe.view(kv, gs, hd).sum(1) * ke).sqrt()
            else:
                qn = q.weight.float().norm(dim=1).view(kv, gs, hd).pow(2).sum(1)
                score = (qn * k.weight.float().norm(dim=1).view(kv, hd).pow(2)).sqrt()
            if unit.rope:
                score = score[:, : hd // 2] + score[:, hd // 2:]
        else:
            cols = o.weight.float().norm(dim=0).view(kv, gs, hd)
            if self.use_data:
                cols = cols * stats[unit.modules["o"]].col_sq_mean.sqrt().view(kv, gs, hd)
                score = cols.sum(1)
            else:
                score = (cols.pow(2).sum(1) + v.weight.float().norm(dim=1).view(kv, hd).pow(2)).sqrt()
        return score.sum(0) if unit.shared else score

    def process(self, block_name, block, stats):
        for unit in self.units.get(block_name, []):
            score = self._scores(unit, stats).flatten()
            removed = int(round(self.sparsity * score.numel()))
            removed = min(removed, score.numel() - 1)
            keep = torch.ones(score.numel(), dtype=torch.bool)
            keep[torch.argsort(score)[:removed]] = False
            mask = unit.expand(keep.view(unit.shape).float()).bool()
            linear = self.model.get_submodule(unit.module)
            with torch.no_grad():
                if unit.kind == "mlp":
                    linear.weight[:, ~mask] = 0
                else:
                    linear.weight[~mask] = 0
                    if linear.bias is not None:
                        linear.bias[~mask] = 0


def structured_baseline(model, config, x, sparsity: float, use_data: bool):
    from hf_prune.methods.spp import build_units
    from hf_prune.models import get_family

    model = copy.deepcopy(model)
    start = time.perf_counter()
    units = build_units(model, config)
    stages = get_family(model).stages(model)
    batches = [{"pixel_values": x[i: i + 64]} for i in range(0, 256, 64)] if use_data else None
    walk(model, stages, batches, StructuredBaseline(model, units, sparsity, use_data), device=torch.device("cpu"),
         progress=False)
    return model, time.perf_counter() - start


def part_structured(args) -> None:
    x, y = digits()
    model = trained_vit(x, y, args.train_steps, args.cache)
    params = sum(p.numel() for p in model.parameters())
    dense_acc = accuracy(model, x, y)
    print(f"\n## structured: ViT ({params:,} parameters, 4 blocks, 4 heads of 16) on digits, dense held-out "
          f"accuracy {dense_acc:.4f}\n")
    searches = {}
    for name, cfg in (("spp", SPPConfig(lr=args.lr, lam=args.lam, nu=args.nu, coupling="split_lbi",
                                         record_every=10, share_across_heads=args.share)),
                      ("spp-released", SPPConfig(lr=args.lr, lam=args.lam_released, coupling="released",
                                                  record_every=10, share_across_heads=args.share))):
        path, seconds = spp_search(model, x, y, cfg, args.search_steps, os.path.join(args.out, name))
        searches[name] = (cfg, path, seconds)
        path.plot(os.path.join(args.out, f"{name}.png"))
        print(f"{name}: search {args.search_steps} steps in {seconds:.1f} s; path plot {args.out}/{name}.png")
    rows, totals = [], {}
    for s in SPARSITIES:
        row = [f"{s:.1f}"]
        for name, (cfg, path, seconds) in searches.items():
            start = time.perf_counter()
            small = path.materialize(model, s)
            read = time.perf_counter() - start
            totals[name] = totals.get(name, seconds) + read
            row += [f"{accuracy(small, x, y):.4f}", f"{sum(p.numel() for p in small.parameters()):,}", f"{read:.2f}"]
        cfg = searches["spp"][0]
        for name, use_data in (("magnitude-sp", False), ("activation-sp", True)):
            pruned, seconds = structured_baseline(model, cfg, x, s, use_data)
            totals[name] = totals.get(name, 0.0) + seconds
            row += [f"{accuracy(pruned, x, y):.4f}"]
        rows.append(row)
    headers = ["sparsity"]
    for name in searches:
        headers += [f"{name} acc", "params", "read-off s"]
    headers += ["magnitude-sp acc", "activation-sp acc"]
    print(format_table(rows, headers))
    print("\ntotal time for the whole curve (s): " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()))


# --------------------------------------------------------------------------------------------------
# part 2: the training-free path (ours) against RIA


def part_llm(args) -> None:
    from hf_prune.evaluation import perplexity

    if args.model == "toy":
        from hf_prune.toy import toy_causal_lm

        model, tokenizer = toy_causal_lm(args.toy_size)
        calibration_text = eval_text = "builtin:python-docs"
        label = f"toy LLaMA {args.toy_size}"
    else:
        base = Pruner.from_pretrained(args.model, dtype=torch.float32)
        model, tokenizer = base.model, base.tokenizer
        calibration_text, eval_text = args.calibration, args.eval
        label = args.model
    model.eval()
    seq_len = args.seq_len or (128 if args.model == "toy" else 256)
    cal = CalibrationConfig(num_samples=args.num_samples, seq_len=seq_len, seed=0)
    ev = dict(seq_len=seq_len, max_windows=args.eval_windows)
    dense = perplexity(model, tokenizer, eval_text, **ev)
    params = sum(p.numel() for p in model.parameters())
    print(f"\n## training-free (ours, correction {args.correction}, step_fraction {args.step_fraction}) vs RIA: "
          f"{label} ({params:,} parameters), dense perplexity {dense:.3f}; {args.num_samples} x {seq_len} "
          f"calibration tokens of {calibration_text}, {args.eval_windows} windows of {eval_text}\n")
    start = time.perf_counter()
    pruner = Pruner(copy.deepcopy(model), tokenizer)
    path = pruner.prune(SPPConfig(sparsity=0.5, training_free=True, calibration=cal, step_fraction=args.step_fraction,
                                  correction=args.correction),
                        calibration_dataset=calibration_text, progress=False).path
    path_seconds = time.perf_counter() - start
    path.plot(os.path.join(args.out, "training-free.png"))
    rows, ours_total, ria_total = [], path_seconds, 0.0
    for s in args.sparsities:
        start = time.perf_counter()
        ours_model = path.apply(model, s)
        read = time.perf_counter() - start
        ours_total += read
        start = time.perf_counter()
        ria = Pruner(copy.deepcopy(model), tokenizer)
        ria.prune(RIAConfig(sparsity=s, calibration=cal), calibration_dataset=calibration_text, progress=False)
        seconds = time.perf_counter() - start
        ria_total += seconds
        rows.append([f"{s:.1f}", f"{perplexity(ours_model, tokenizer, eval_text, **ev):.3f}",
                     f"{read:.2f}", f"{perplexity(ria.model, tokenizer, eval_text, **ev):.3f}",
                     f"{seconds:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    print(f"ours: one pass building the path: {path_seconds:.1f} s")
    print(format_table(rows, ["sparsity", "ours ppl", "ours read-off s", "RIA ppl", "RIA s"]))
    print(f"\ntotal time for the whole curve (s): ours {ours_total:.1f}, RIA {ria_total:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["structured", "llm", "both"], default="both")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "solution_path"))
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "hf_prune", "bench"))
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--search-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lam", type=float, default=0.01, help="split_lbi threshold")
    parser.add_argument("--nu", type=float, default=100.0, help="split_lbi coupling")
    parser.add_argument("--lam-released", type=float, default=1.0, help="released-code threshold")
    parser.add_argument("--share", action=argparse.BooleanOptionalAction, default=False,
                        help="one attention mask per block shared by all heads")
    parser.add_argument("--model", default=PYLM, help="part llm: a causal LM folder or Hub id (default: the shared "
                                                       "trained decoder); 'toy': hf_prune.toy's LLaMA")
    parser.add_argument("--calibration", default=f"{PYLM_DATA}/calibration.txt", help="part llm: calibration text")
    parser.add_argument("--eval", default=f"{PYLM_DATA}/heldout.txt", help="part llm: held-out text")
    parser.add_argument("--toy-size", default="small", choices=["tiny", "small"])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=None, help="part llm: 256 (128 for the toy)")
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--step-fraction", type=float, default=SPPConfig.step_fraction)
    parser.add_argument("--correction", type=float, default=SPPConfig.correction)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    if args.part in ("structured", "both"):
        part_structured(args)
    if args.part in ("llm", "both"):
        part_llm(args)


if __name__ == "__main__":
    main()
