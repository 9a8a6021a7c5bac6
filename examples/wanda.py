"""Wanda (Sun et al., 2024): score each weight by |W_ij| * ||x_j|| (the norm of its input over calibration
tokens) and remove the lowest scores of every output row. One forward pass per block, no weight update.

    python examples/wanda.py                           # 50% unstructured, the shared trained decoder
    python examples/wanda.py --pattern 2:4 --output out/wanda-2of4 [--push-to your-name/tiny-wanda-2of4]
    python examples/wanda.py --model meta-llama/Llama-2-7b-hf --num-samples 128 --seq-len 2048
"""

from example_utils import run, sparsity_arg

from hf_prune import CalibrationConfig, WandaConfig


def make_config(args):
    return WandaConfig(sparsity=sparsity_arg(args), pattern=args.pattern,
                       calibration=CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, seed=0))


if __name__ == "__main__":
    run(__doc__, make_config)
