"""ModHiFi (NeurIPS 2025): structured pruning that removes whole MLP hidden neurons (gate/up rows and down columns)
chosen by subset fidelity, then compensates the kept ones with a closed-form least-squares update. The model
becomes physically smaller: the saved config has the new `intermediate_size` and the stock class reloads it.

    python examples/modhifi.py                                   # 25% of the MLP neurons of the shared trained decoder
    python examples/modhifi.py --sparsity 0.5 --score saliency --output out/modhifi-50

``--sparsity`` here is the fraction of MLP neurons removed (the same in every block by default, so no remote code
is needed to reload); the report gives parameters and FLOPs before and after and each layer's reconstruction
error (1 - fidelity).
"""

from example_utils import run

from hf_prune import CalibrationConfig, ModHiFiConfig


def options(parser):
    parser.set_defaults(sparsity=0.25)
    parser.add_argument("--score", default="auto",
                        choices=["auto", "singleton_fidelity", "saliency", "cholesky_rownorm", "greedy_fidelity"])
    parser.add_argument("--compensation", default="least_squares", choices=["least_squares", "none"])


def make_config(args):
    if args.pattern != "unstructured":
        raise SystemExit("ModHiFi removes whole neurons; --pattern does not apply (use --sparsity).")
    return ModHiFiConfig(sparsity=args.sparsity, score=args.score, compensation=args.compensation,
                         calibration=CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, seed=0))


if __name__ == "__main__":
    run(__doc__, make_config, options=options)
