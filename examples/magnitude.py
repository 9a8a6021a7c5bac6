"""Magnitude pruning: remove the weights with the smallest |W| (data-free; the classic baseline).

    python examples/magnitude.py                       # 50% unstructured, the shared trained decoder
    python examples/magnitude.py --pattern 2:4 --output out/magnitude-2of4

``scope="matrix"`` (default) ranks a whole weight matrix at once; ``scope="row"`` meets the budget per output row.
No calibration data is read, so ``--num-samples`` is ignored.
"""

from example_utils import run, sparsity_arg

from hf_prune import MagnitudeConfig


def make_config(args):
    return MagnitudeConfig(sparsity=sparsity_arg(args), pattern=args.pattern, scope="matrix")


if __name__ == "__main__":
    run(__doc__, make_config)
