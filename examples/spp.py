"""SPP for language models, training-free (hf_prune's own variant, experimental and opt-in with training_free=True:
on the shared trained decoder it beats RIA from 40% to 70% but not at 30%; the paper's LLM algorithm is unpublished): one
calibration pass ranks every weight of the pruned Linear layers along a path, so any unstructured sparsity reads
off it without recomputing. The structured search on masks (q-k, v-o, MLP neurons) with the Trainer callback,
which gives physically smaller models, is shown in the README's SPP section.

    python examples/spp.py                                   # 50% on the shared trained decoder
    python examples/spp.py --sparsity 0.6 --output out/spp-60
"""

from example_utils import run

from hf_prune import CalibrationConfig, SPPConfig


def make_config(args):
    if args.pattern != "unstructured":
        raise SystemExit("SPP's training-free path reads off unstructured sparsities; use --sparsity.")
    return SPPConfig(sparsity=args.sparsity, training_free=True,  # experimental: see SPPConfig's docstring
                     calibration=CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, seed=0))


if __name__ == "__main__":
    run(__doc__, make_config)
