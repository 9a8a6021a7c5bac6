"""torch-pruning's side of the structured comparison in benchmarks/vs_peers.py, in a fresh process.

Removes the same fraction of MLP hidden neurons in every decoder block as ModHiFi does (equal widths), chosen by
torch-pruning's group L2 importance (``GroupMagnitudeImportance(p=2)``: the L2 norms of the coupled gate/up rows
and down column, mean-reduced and mean-normalised over the group) and removed through its dependency graph
(``DependencyGraph.get_pruning_group(gate_proj, prune_linear_out_channels, idxs).prune()``), then saves with a
rewritten ``intermediate_size``. Data-free, no compensation. One JSON line: prune time and peak RSS of the prune.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from measure import page_in, rss_now  # this folder is sys.path[0] when a worker runs

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from hf_prune.engine.report import _reset_vm_hwm, _vm_hwm_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--sparsity", type=float, required=True, help="fraction of MLP hidden neurons removed")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp-path", required=True, help="folder where torch-pruning is installed (pip --target)")
    args = parser.parse_args()
    sys.path.insert(0, args.tp_path)
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    page_in(model)
    before = rss_now()
    _reset_vm_hwm()
    start = time.perf_counter()
    example = torch.randint(0, model.config.vocab_size, (1, 8))
    model.config.use_cache = False
    graph = tp.DependencyGraph().build_dependency(model, example_inputs={"input_ids": example},
                                                  output_transform=lambda out: out.logits)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    width = model.config.intermediate_size
    keep = width - int(round(args.sparsity * width))
    for layer in model.model.layers:
        mlp = layer.mlp
        scores = importance(graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels,
                                                    idxs=list(range(width))))
        drop = torch.argsort(scores)[: width - keep].tolist()
        group = graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels, idxs=sorted(drop))
        if not graph.check_pruning_group(group):
            raise RuntimeError("torch-pruning refused the MLP group")
        group.prune()
        mlp.intermediate_size = keep
    seconds = time.perf_counter() - start
    rss = _vm_hwm_bytes()
    model.config.intermediate_size = keep
    model.save_pretrained(args.out)
    print(json.dumps({"prune_s": seconds, "peak_rss_bytes": rss, "rss_before_bytes": before, "version": tp.__version__}))


if __name__ == "__main__":
    main()
