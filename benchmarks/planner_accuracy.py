"""How close `hf-prune plan`'s time estimate comes to a real prune on this machine.

For each method: the planned time with the default throughput (one large matmul timed), with `--measure-block`
(one real block timed), and the measured wall time of `Pruner.prune` on the shared trained decoder
(../shared/models/pylm) with the same samples and sequence length. Prints a table; asserts nothing.

    OMP_NUM_THREADS=1 python benchmarks/planner_accuracy.py --methods wanda sparsegpt ecoflap
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_prune import CalibrationConfig, Pruner  # noqa: E402
from hf_prune.engine.report import format_table  # noqa: E402
from hf_prune.planner import human_seconds, plan  # noqa: E402
from hf_prune.registry import get_method  # noqa: E402

SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "models"))
PYLM = os.path.join(SHARED, "pylm")
CALIBRATION = os.path.join(SHARED, "pylm-data", "calibration.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "ecoflap"])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    if not os.path.isdir(PYLM):
        sys.exit(f"the shared trained decoder is not at {PYLM}")
    rows = []
    for method in args.methods:
        matmul = plan(PYLM, method, num_samples=args.num_samples, seq_len=args.seq_len, device="cpu")
        block = plan(PYLM, method, num_samples=args.num_samples, seq_len=args.seq_len, device="cpu",
                     measure_block=True)
        pruner = Pruner.from_pretrained(PYLM)
        config = get_method(method).config_class(calibration=CalibrationConfig(
            dataset=CALIBRATION, num_samples=args.num_samples, seq_len=args.seq_len, seed=0))
        start = time.perf_counter()
        pruner.prune(config, progress=False)
        real = time.perf_counter() - start
        rows.append([method, human_seconds(matmul.seconds), human_seconds(block.seconds), human_seconds(real),
                     f"{real / matmul.seconds:.1f}x", f"{real / block.seconds:.1f}x"])
        print(rows[-1], flush=True)
    print(f"pylm (Qwen3-shaped, 4.2 M parameters), {args.num_samples} samples x {args.seq_len} tokens, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(format_table(rows, ["method", "planned (matmul)", "planned (--measure-block)", "measured",
                              "measured / planned (matmul)", "measured / planned (block)"]))


if __name__ == "__main__":
    main()
