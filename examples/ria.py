"""RIA (Zhang et al., 2024): relative importance |W_ij|/sum|W_i:| + |W_ij|/sum|W_:j|, times ||x_j||^alpha,
ranked per matrix — it avoids emptying whole input channels or output rows as Wanda/magnitude can.

    python examples/ria.py                             # 50% unstructured, the shared trained decoder
    python examples/ria.py --pattern 2:4 --alpha 0.5 --output out/ria-2of4
"""

from example_utils import run, sparsity_arg

from hf_prune import CalibrationConfig, RIAConfig


def options(parser):
    parser.add_argument("--alpha", type=float, default=0.5, help="exponent of the input norm (the paper's 0.5)")


def make_config(args):
    return RIAConfig(sparsity=sparsity_arg(args), pattern=args.pattern, alpha=args.alpha, scope="matrix",
                     calibration=CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, seed=0))


if __name__ == "__main__":
    run(__doc__, make_config, options=options)
