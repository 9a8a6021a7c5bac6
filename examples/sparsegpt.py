"""SparseGPT (Frantar & Alistarh, 2023): prune with the inverse Hessian of each layer's inputs (H = 2XᵀX/N)
and update the remaining weights to compensate, column block by column block (OBS reconstruction).

    python examples/sparsegpt.py                       # 50% unstructured, the shared trained decoder
    python examples/sparsegpt.py --pattern 2:4 --output out/sparsegpt-2of4

``block_size`` columns are solved together (128 in the paper; smaller layers use their width); ``damp`` is the
dampening added to the Hessian's diagonal as a fraction of its mean, raised tenfold (up to ``max_damp``) when the
Hessian is not positive definite; the report records what was used.
"""

from example_utils import run, sparsity_arg

from hf_prune import CalibrationConfig, SparseGPTConfig


def make_config(args):
    return SparseGPTConfig(sparsity=sparsity_arg(args), pattern=args.pattern, block_size=128, damp=0.01,
                           calibration=CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, seed=0))


if __name__ == "__main__":
    run(__doc__, make_config)
