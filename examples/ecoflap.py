"""ECoFLaP (Sung et al., ICLR 2024): stage 1 gives every block (or Linear, or sub-model) its own sparsity from a
global, loss-aware score (zeroth order: forward passes only; first order: one backward per batch); stage 2 runs a
layer-wise pruner (Wanda by default) with those sparsities. It pays off at high sparsity (60-70%).

    python examples/ecoflap.py                                   # 60% on the shared trained decoder, zeroth order
    python examples/ecoflap.py --sparsity 0.7 --score first_order --layer-pruner sparsegpt --output out/ecoflap-70

The allocation is saved next to the model (sparsity_allocation.json and its picture) and any layer-wise pruner
reuses it without recomputing scores: ``WandaConfig(module_sparsity=Allocation.load(...))``.
"""

from example_utils import run

from hf_prune import CalibrationConfig, ECoFLaPConfig


def options(parser):
    parser.set_defaults(sparsity=0.6)
    parser.add_argument("--score", default="zeroth_order", choices=["zeroth_order", "first_order"])
    parser.add_argument("--layer-pruner", default="wanda", choices=["wanda", "sparsegpt", "ria", "magnitude"])
    parser.add_argument("--granularity", default="block", choices=["block", "layer"])
    parser.add_argument("--num-score-samples", type=int, default=16, help="samples for the stage-1 scores")


def make_config(args):
    return ECoFLaPConfig(sparsity=args.sparsity, score=args.score, layer_pruner=args.layer_pruner,
                         granularity=args.granularity, num_score_samples=args.num_score_samples,
                         pattern=args.pattern,
                         calibration=CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, seed=0))


if __name__ == "__main__":
    run(__doc__, make_config, options=options)
