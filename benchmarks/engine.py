"""The engine at real layer widths: each method's time over one forward of the blocks, peak RSS over the weights,
the planner's host estimate next to the measurement, and the profile's top entries.

    python benchmarks/engine.py                                       # hidden 512 and 1024, 2 blocks, 4 x 512 tokens
    python benchmarks/engine.py --hidden 2048 --layers 1 --tokens 256 --samples 2
    python benchmarks/engine.py --hidden 4096 --layers 1 --tokens 128 --samples 1 --methods sparsegpt --profile

Models are random LLaMAs with the real widths (intermediate = 2.6875 x hidden as in LLaMA-2: 512 -> 1376,
4096 -> 11008; heads of 128; a 512-token vocabulary so the blocks dominate), fp32 on the CPU. Every
(width, method) runs in a fresh subprocess so that its peak RSS is its own; inside it, one forward of the blocks
over the calibration batches is timed first (median of 3) and the prune after it, so ``x fwd`` is a ratio
within one process. The floor for Wanda and SparseGPT is 2.0 x fwd (a statistics pass and a pass of the pruned
block per block) plus, for SparseGPT, its solves. ``peak/W``: the process's peak RSS during the prune over the
weights' bytes; ``+peak/W``: the same above the RSS just before the prune. ``plan``: ``hf_prune.planner.plan``'s
host peak for the same model and data, ``plan/meas``: it over the measured peak RSS. ``peak/(W+blk)``: the peak
RSS less the runtime's own (the process's RSS after its imports, before any model exists) over the weights plus
one block's working set as the planner counts it (statistics of every distinct input, the largest per-layer
solve, one batch's forward, the cached block inputs and outputs).

SparseGPT's ``floor``: 2 x fwd (the statistics pass and the pruned block's pass) plus, per block, the Gram
updates (2 x tokens x in^2 per distinct input), the factors (4/3 n^3 per distinct input for the default
Cholesky -> cholesky_inverse -> Cholesky, 2/3 n^3 for ``--factorization triangular_inverse``) and the lazy
trailing updates (2 x rows x 128 x the columns right of each 128-column block, per Linear), all at the GEMM speed
measured in the same process (best of three timings of ten 1024^3 float32 matmuls); ``/floor``: the prune's time over it. Prints; never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from peers.measure import rss_now  # noqa: E402  (this folder is on sys.path when a script here runs)

METHODS = ("magnitude", "wanda", "sparsegpt", "sparsegpt-2:4", "ria")
GIB = 2 ** 30


def intermediate_of(hidden: int) -> int:
    return int(round(hidden * 2.6875 / 16)) * 16



def sparsegpt_floor_flops(hidden: int, intermediate: int, tokens: int, factorization: str | None) -> float:
    """Per block of the benchmark's LLaMA: Gram, factor and trailing-update flops (see the module docstring)."""
    distinct = [hidden, hidden, hidden, intermediate]  # q/k/v, o, gate/up, down
    linears = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]  # (rows, cols)
    grams = sum(2 * tokens * n * n for n in distinct)
    factors = (2 / 3 if factorization == "triangular_inverse" else 4 / 3) * sum(n ** 3 for n in distinct)
    trailing = sum(2 * rows * min(128, cols - i1) * max(0, cols - i1 - 128)
                   for rows, cols in linears for i1 in range(0, cols, 128))
    return grams + factors + trailing


def child(args: argparse.Namespace) -> None:
    """One (width, method) measurement; prints one JSON line."""
    import torch
    import transformers as T

    from hf_prune import CalibrationConfig, MagnitudeConfig, Pruner, RIAConfig, SparseGPTConfig, WandaConfig
    from hf_prune.engine.report import _reset_vm_hwm, _vm_hwm_bytes
    from hf_prune.engine.walker import calibration_mode, capture_stage_inputs
    from hf_prune.models import get_family
    from hf_prune.planner import measure_matmul_flops, plan

    runtime = rss_now()  # the interpreter and its imports, before any model exists

    torch.set_num_threads(args.threads)
    hidden = args.hidden[0]
    config = T.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate_of(hidden),
                           num_hidden_layers=args.layers, num_attention_heads=max(1, hidden // 128),
                           num_key_value_heads=max(1, hidden // 128), max_position_embeddings=max(2048, args.tokens),
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config)  # transformers' own initialisation (std 0.02), buffers included
    model.eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 512, (1, args.tokens), generator=g),
                "attention_mask": torch.ones(1, args.tokens, dtype=torch.long)} for _ in range(args.samples)]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    # one forward of the blocks over the calibration batches
    stages = get_family(model).stages(model)
    with calibration_mode(model):
        inputs = capture_stage_inputs(model, stages[0], stages, batches, torch.device("cpu"))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for i in range(len(inputs.hidden)):
                h = inputs.hidden[i]
                for block in stages[0].blocks(model):
                    h = block(h, *inputs.args[i], **inputs.kwargs[i])
                    h = h[0] if isinstance(h, tuple) else h
            times.append(time.perf_counter() - start)
        forward = statistics.median(times)
    del inputs, h

    name, _, pattern = args.method.partition("-")
    classes = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig, "ria": RIAConfig}
    extra = {"factorization": args.factorization} if name == "sparsegpt" and args.factorization else {}
    cfg = classes[name](pattern=pattern or "unstructured",
                        calibration=CalibrationConfig(num_samples=args.samples, seq_len=args.tokens), **extra)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        planned_run = plan(tmp, name, num_samples=args.samples, seq_len=args.tokens, batch_size=1, dtype="float32",
                           throughput=1e12)
    planned = planned_run.host_peak
    block_set = max(s.stats_bytes + s.solve_bytes + s.forward_bytes + s.activation_cache for s in planned_run.stages)
    gemm = max(measure_matmul_flops(torch.device("cpu"), torch.float32, repeats=10) for _ in range(3))  # best of 3
    floor = None
    if name == "sparsegpt":
        floor = 2 * forward + args.layers * sparsegpt_floor_flops(
            hidden, intermediate_of(hidden), args.samples * args.tokens, args.factorization) / gemm
    pruner = Pruner(model, None)
    before = rss_now()
    _reset_vm_hwm()
    profile = []
    start = time.perf_counter()
    if args.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            pruner.prune(cfg, calibration_dataset=batches, progress=False)
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        profile = [(e.key, e.count, round(100 * e.self_cpu_time_total / max(total, 1), 1)) for e in top]
    else:
        pruner.prune(cfg, calibration_dataset=batches, progress=False)
    seconds = time.perf_counter() - start
    peak = _vm_hwm_bytes()
    print(json.dumps({"hidden": hidden, "method": args.method, "forward": forward, "seconds": seconds,
                      "weights": weight_bytes, "peak": peak, "before": before, "planned": planned,
                      "runtime": runtime, "block_set": block_set, "gemm": gemm, "floor": floor, "profile": profile}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per calibration sample")
    parser.add_argument("--samples", type=int, default=4, help="calibration samples (batches of one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "sparsegpt-2:4"], choices=METHODS)
    parser.add_argument("--factorization", default=None,
                        help="SparseGPT's factorization (default: the config's); ignored by checkouts without it")
    parser.add_argument("--profile", action="store_true", help="print the top torch profiler entries per run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.method = args.child
        child(args)
        return
    from hf_prune.engine.report import format_table

    rows, profiles = [], []
    for hidden in args.hidden:
        for method in args.methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--hidden", str(hidden),
                   "--layers", str(args.layers), "--tokens", str(args.tokens), "--samples", str(args.samples),
                   "--threads", str(args.threads)]
            if args.factorization:
                cmd += ["--factorization", args.factorization]
            if args.profile:
                cmd.append("--profile")
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                rows.append([hidden, method, "failed"] + [""] * 9)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append([hidden, intermediate_of(hidden), method, f"{r['seconds']:.2f}", f"{r['forward']:.2f}",
                         f"{r['seconds'] / r['forward']:.2f}", f"{r['peak'] / r['weights']:.2f}",
                         f"{(r['peak'] - r['before']) / r['weights']:.2f}",
                         f"{(r['peak'] - r['runtime']) / (r['weights'] + r['block_set']):.2f}",
                         f"{r['planned'] / GIB:.2f} / {r['peak'] / GIB:.2f} = {r['planned'] / r['peak']:.2f}",
                         "" if r["floor"] is None else f"{r['floor']:.2f} ({r['floor'] / r['forward']:.2f})",
                         "" if r["floor"] is None else f"{r['seconds'] / r['floor']:.2f}", f"{r['gemm'] / 1e9:.0f}"])
            print("  ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
            if r["profile"]:
                profiles.append((hidden, method, r["profile"]))
    print(f"{args.layers} block(s), {args.samples} x {args.tokens} calibration tokens, {args.threads} thread(s), fp32")
    print(format_table(rows, ["hidden", "intermediate", "method", "prune s", "fwd s", "x fwd", "peak/W", "+peak/W",
                              "peak/(W+blk)", "plan / measured GiB", "floor s (x fwd)", "/floor", "GEMM GFLOP/s"]))
    for hidden, method, profile in profiles:
        print(f"\nprofile, hidden {hidden}, {method} (self CPU time):")
        print(format_table([[k, c, f"{p}%"] for k, c, p in profile], ["op", "calls", "share"]))


if __name__ == "__main__":
    main()
