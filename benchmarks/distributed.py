"""Data-parallel calibration: wall time of one-shot pruning with 1 and 2 processes on the shared trained decoder.

    python benchmarks/distributed.py                    # Wanda and SparseGPT, 64 x 256 tokens, batch 4
    python benchmarks/distributed.py --methods wanda --num-samples 128 --seq-len 512

For each method it launches ``torch.distributed.run`` (gloo on loopback) with one process, and with two, each on
one intra-op thread, plus one process on two threads (what the same two cores give without torch.distributed),
and prints per run: the walk (calibration passes, all-reduce and pruning) time, the whole prune time, the peak
RSS of one process, how many mask entries differ from the one-process run and the largest weight difference.
``wanda:float64`` sums the statistics in float64 (``accum_dtype="float64"``; one and two processes only).

A second table answers "apply everywhere, or compute on rank 0 and broadcast?": for one block, the time every
rank spends on the method's solves for its Linears (what each rank repeats, in parallel) against the time to
broadcast the block's tensors from rank 0 (what the other ranks would wait for on top of rank 0's solve), and the
checksum comparison the walker runs after each block instead.

Numbers depend on the machine: with two cores shared by other work, two processes cannot be twice as fast.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from pylm_paths import PYLM, PYLM_DATA  # noqa: E402  (this folder is on sys.path when a script here runs)


def _config(method: str, args):
    """``wanda``, ``sparsegpt``, or either with ``:float64`` (statistics summed in float64, ``accum_dtype``)."""
    from hf_prune import CalibrationConfig, SparseGPTConfig, WandaConfig

    name, _, accum = method.partition(":")
    calibration = CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                                    dataset=args.calibration, seed=0)
    return {"wanda": WandaConfig, "sparsegpt": SparseGPTConfig}[name](sparsity=0.5, calibration=calibration,
                                                                      accum_dtype=accum or "float32")


def worker(args) -> None:
    """One process of a launch: prune, time, dump the weights (rank 0) and the numbers."""
    import torch
    import torch.distributed as dist

    from hf_prune import Pruner
    from hf_prune.engine.report import _vm_hwm_bytes

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pruner = Pruner.from_pretrained(args.model, dtype=torch.float32)
    config = _config(args.method, args)
    dist.barrier()
    start = time.perf_counter()
    result = pruner.prune(config, progress=False)
    total = time.perf_counter() - start
    record = {"rank": rank, "world_size": dist.get_world_size(), "threads": args.threads, "prune_s": total,
              "walk_s": result.report["run"]["phases_s"].get("walk_and_prune"),
              "peak_rss": _vm_hwm_bytes(), "split": result.report["run"].get("distributed")}
    if args.solve_vs_broadcast:
        record.update(_solve_vs_broadcast(pruner.model, config))
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.detach().clone().contiguous() for k, v in pruner.model.state_dict().items()
                   if k.startswith("model.layers.")}, os.path.join(args.out, "weights.safetensors"))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as fh:
        json.dump(record, fh)
    dist.destroy_process_group()


def _solve_vs_broadcast(model, config) -> dict:
    """For the first block: the method's solves on its Linears (statistics from random inputs of the layer width;
    the solve's cost does not depend on them) against a broadcast of the block's tensors from rank 0."""
    import torch
    import torch.distributed as dist

    from hf_prune.engine.stats import LinearStats
    from hf_prune.patterns import Pattern

    block = model.model.layers[0]
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    pattern = Pattern.parse(config.pattern)
    solve = 0.0
    for m in linears:
        st = LinearStats(m.in_features, frozenset(config.statistics) or frozenset({"sq_norm"}))
        st.update(torch.randn(512, m.in_features, generator=torch.Generator().manual_seed(0)))
        t = time.perf_counter()
        config.prune_weight(m.weight.detach().float(), st, 0.5, pattern)
        solve += time.perf_counter() - t
    tensors = [t.detach().clone() for t in list(block.parameters()) + list(block.buffers())]
    dist.barrier()
    t = time.perf_counter()
    for tensor in tensors:
        dist.broadcast(tensor, src=0)
    dist.barrier()
    broadcast = time.perf_counter() - t
    from hf_prune.engine import distributed

    t = time.perf_counter()
    distributed.check_identical(block)  # what the walker adds after each block: a checksum compared across ranks
    check = time.perf_counter() - t
    return {"block_solve_s": solve, "block_broadcast_s": broadcast, "block_check_s": check,
            "block_bytes": sum(x.numel() * x.element_size() for x in tensors)}


def launch(args, method: str, processes: int, threads: int, out: str, solve_vs_broadcast: bool) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([os.path.join(HERE, ".."), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               os.path.abspath(__file__), "--worker", "--method", method, "--threads", str(threads), "--out", out,
               "--model", args.model, "--calibration", args.calibration, "--num-samples", str(args.num_samples),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    if solve_vs_broadcast:
        command.append("--solve-vs-broadcast")
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the launch failed:\n{proc.stderr[-3000:]}")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=PYLM, help=f"model folder (default: the shared trained decoder {PYLM})")
    parser.add_argument("--calibration", default=os.path.join(PYLM_DATA, "calibration.txt"))
    parser.add_argument("--methods", default="wanda,wanda:float64,sparsegpt",
                        help="comma-separated; METHOD:float64 sums the statistics in float64 (accum_dtype)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--solve-vs-broadcast", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not os.path.isdir(args.model):
        raise SystemExit(f"{args.model} not found: this benchmark runs on the shared trained decoder (or --model).")
    from safetensors.torch import load_file

    from hf_prune.engine.report import format_table

    rows, comparison = [], []
    for method in args.methods.split(","):
        runs = {}
        layouts = ((1, 1), (1, 2), (2, 1)) if ":" not in method else ((1, 1), (2, 1))
        for processes, threads in layouts:
            out = tempfile.mkdtemp(prefix=f"hf_prune_dist_{method.replace(':', '-')}_{processes}x{threads}-")
            records = launch(args, method, processes, threads, out, solve_vs_broadcast=processes == 2)
            runs[(processes, threads)] = (records, load_file(os.path.join(out, "weights.safetensors")))
        base_records, base_weights = runs[(1, 1)]
        for (processes, threads), (records, weights) in runs.items():
            swapped = sum(int(((weights[k] == 0) != (v == 0)).sum()) for k, v in base_weights.items())
            entries = sum(v.numel() for v in base_weights.values())
            diff = max(float((weights[k] - v).abs().max()) for k, v in base_weights.items())
            walk = max(r["walk_s"] for r in records)
            rows.append([method, processes, threads, f"{walk:.2f}", f"{max(r['prune_s'] for r in records):.2f}",
                         f"{base_records[0]['walk_s'] / walk:.2f}x", f"{max(r['peak_rss'] for r in records) / 2**20:.0f}",
                         f"{swapped} of {entries / 1e6:.1f}M", f"{diff:.1e}"])
        two = runs[(2, 1)][0][0]
        if ":" not in method:
            comparison.append([method, f"{two['block_bytes'] / 2**20:.2f}", f"{1000 * two['block_solve_s']:.1f}",
                               f"{1000 * two['block_broadcast_s']:.1f}", f"{1000 * two['block_check_s']:.1f}"])
    print(f"model {args.model}; calibration {args.calibration}: {args.num_samples} samples x {args.seq_len} tokens, "
          f"batch {args.batch_size}; gloo on loopback; float32 weights\n")
    print(format_table(rows, ["method", "processes", "threads each", "walk s", "prune s", "walk speed-up",
                              "peak RSS/process MiB", "mask entries unlike 1 process", "max |dW| vs 1 process"]))
    print("\nper block, 2 processes: what every rank repeats (the solves) vs what broadcasting would add")
    print(format_table(comparison, ["method", "block MiB", "solves ms (every rank)", "broadcast ms (rank 0 -> all)",
                                    "checksum check ms"]))


if __name__ == "__main__":
    main()
