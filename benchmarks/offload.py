"""Bigger than memory: peak host memory of pruning a model whose weights exceed the allowed CPU budget.

    python benchmarks/offload.py                       # ~480 MB fp32 LLaMA from a config, wanda, 2 modes
    python benchmarks/offload.py --layers 12 --hidden 1024 --budget-mb 150 --method sparsegpt

A LLaMA is built from a config (random weights, seed 0) and saved once to a temporary folder with a small trained
tokenizer. Each mode then runs in its own fresh process: load, prune (``Pruner.prune``) and ``save_pretrained``.

- ``in memory``: ``from_pretrained(folder)``: every weight in RAM;
- ``disk offload``: ``from_pretrained(folder, device_map="auto", max_memory={"cpu": budget}, offload_folder=...)``:
  accelerate keeps what exceeds the budget on disk; the walker materialises one block at a time and writes the
  pruned tensors back to the offload folder.

For each: the peak RSS (VmHWM) above the RSS right after importing torch and transformers (what the run itself
added) as it stands after loading, after pruning and after saving, and the whole process's peak, next to the weight size and the planner's host-memory estimate
(``hf_prune.planner.plan(..., offload=...)``). The last column says whether every saved tensor equals the
in-memory run's (torch.equal). Prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from oneshot import rss_bytes  # noqa: E402  (this folder is on sys.path when a script here runs)

MB = 2 ** 20


def _vm_hwm() -> int:
    from hf_prune.engine.report import _vm_hwm_bytes

    return _vm_hwm_bytes() or 0


def child(args: argparse.Namespace) -> None:
    import torch
    import transformers  # noqa: F401  (imported before the baseline is read)

    from hf_prune import CalibrationConfig, Pruner
    from hf_prune.registry import get_method

    torch.set_num_threads(args.threads)
    baseline = rss_bytes()
    kwargs = {}
    if args.mode == "disk":
        kwargs = dict(device_map="auto", max_memory={"cpu": args.budget_mb * MB}, offload_folder=args.offload)
    start = time.perf_counter()
    pruner = Pruner.from_pretrained(args.folder, dtype=torch.float32, **kwargs)
    loaded = _vm_hwm()
    placement = sorted(set(map(str, getattr(pruner.model, "hf_device_map", {"": "cpu"}).values())))
    config = get_method(args.method).config_class(
        sparsity=0.5, calibration=CalibrationConfig(num_samples=args.samples, seq_len=args.seq_len, seed=0))
    pruner.prune(config, calibration_dataset="builtin:python-docs", progress=False)
    pruned = _vm_hwm()
    # offloaded: transformers assembles each shard in RAM when saving, so shards no bigger than the budget
    pruner.save_pretrained(args.out, max_shard_size=f"{args.budget_mb // 2}MB" if args.mode == "disk" else "5GB")
    seconds = time.perf_counter() - start
    print(json.dumps({"baseline": baseline, "loaded": loaded, "pruned": pruned, "peak": _vm_hwm(),
                      "seconds": seconds, "placement": placement}))


def _build(folder: str, args: argparse.Namespace) -> int:
    import torch
    import transformers as T

    from hf_prune.calibration import builtin_texts
    from hf_prune.toy import train_tokenizer

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                           num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                           num_key_value_heads=args.hidden // 64, max_position_embeddings=512, bos_token_id=1,
                           eos_token_id=2, pad_token_id=3)
    model = T.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    train_tokenizer(list(builtin_texts("builtin:python-docs", "train"))[:2000]).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) * 4


def _same(a: str, b: str) -> bool:
    import torch
    from safetensors import safe_open

    def files(folder):
        return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))

    keys_a: dict[str, str] = {}
    for f in files(a):
        with safe_open(os.path.join(a, f), "pt") as fh:
            keys_a.update({k: f for k in fh.keys()})
    seen = 0
    for f in files(b):
        with safe_open(os.path.join(b, f), "pt") as fb:
            for k in fb.keys():
                if k not in keys_a:
                    return False
                with safe_open(os.path.join(a, keys_a[k]), "pt") as fa:
                    if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                        return False
                seen += 1
    return seen == len(keys_a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--budget-mb", type=int, default=160, help="max_memory for CPU weights in disk mode")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="set MALLOC_MMAP_THRESHOLD_ in the children (glibc), e.g. 65536: freed block tensors "
                             "go back to the OS instead of staying in the heap")
    parser.add_argument("--child", choices=["memory", "disk"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--offload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return

    from hf_prune.engine.report import format_table
    from hf_prune.planner import plan

    work = tempfile.mkdtemp(prefix="hf_prune_offload_bench-")
    try:
        folder = os.path.join(work, "model")
        weight_bytes = _build(folder, args)
        rows, outs = [], {}
        for mode, offload in (("memory", "none"), ("disk", "disk")):
            out = os.path.join(work, f"out-{mode}")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--folder", folder, "--out", out,
                   "--offload", os.path.join(work, "offload"), "--budget-mb", str(args.budget_mb),
                   "--method", args.method, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                   "--threads", str(args.threads)]
            env = dict(os.environ)
            if args.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            outs[mode] = out
            planned = plan(folder, args.method, num_samples=args.samples, seq_len=args.seq_len, batch_size=8,
                           dtype="float32", offload=offload, throughput=1e11,
                           max_memory=args.budget_mb * MB if offload == "disk" else None)
            same = "reference" if mode == "memory" else ("yes" if _same(outs["memory"], out) else "NO")
            rows.append([
                "in memory" if mode == "memory" else f"disk offload (max_memory cpu {args.budget_mb} MiB)",
                "+".join(got["placement"]), f"{weight_bytes / MB:.0f}", f"{planned.host_peak / MB:.0f}",
                f"{(got['loaded'] - got['baseline']) / MB:.0f}", f"{(got['pruned'] - got['baseline']) / MB:.0f}",
                f"{(got['peak'] - got['baseline']) / MB:.0f}", f"{got['peak'] / MB:.0f}", f"{got['seconds']:.1f}",
                same])
        print(f"{args.method} 50%, LLaMA {args.layers} layers x hidden {args.hidden} (vocab {args.vocab}), fp32, "
              f"{args.samples} samples x {args.seq_len} tokens, {args.threads} CPU threads")
        if args.mmap_threshold:
            print(f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}")
        print("peak RSS above the RSS after imports, in MiB, as high-water marks after each step")
        print(format_table(rows, ["mode", "placement", "weights MiB", "planner host MiB", "after load",
                                  "after prune", "after save", "process peak MiB", "load+prune+save s",
                                  "same tensors"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
