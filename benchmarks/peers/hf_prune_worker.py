"""Our side of benchmarks/vs_peers.py (layer-wise methods, and ModHiFi for the structured comparison), in a fresh process like the peer's: load, prune, save; one JSON line with
the prune time and the peak RSS of the prune (high-water mark reset after loading, as in the peer worker)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from measure import page_in, rss_now  # this folder is sys.path[0] when a worker runs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from hf_prune import CalibrationConfig, MagnitudeConfig, ModHiFiConfig, Pruner, SparseGPTConfig, WandaConfig  # noqa: E402
from hf_prune.engine.report import _reset_vm_hwm, _vm_hwm_bytes  # noqa: E402

CONFIGS = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig,
           "modhifi": ModHiFiConfig}  # modhifi: --sparsity is the fraction of MLP neurons removed (equal widths)




def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--method", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration samples per batch (the peer runs one)")
    args = parser.parse_args()
    pruner = Pruner.from_pretrained(args.model, dtype=torch.float32)
    ids = torch.load(args.calibration)
    batches = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(args.batch_size)]
    calibration = CalibrationConfig(num_samples=len(ids))
    if args.method == "modhifi":
        config = ModHiFiConfig(sparsity=args.sparsity, calibration=calibration)
    else:
        config = CONFIGS[args.method](sparsity=args.sparsity if args.pattern == "unstructured" else None,
                                      pattern=args.pattern, calibration=calibration)
    page_in(pruner.model)
    before = rss_now()
    _reset_vm_hwm()
    start = time.perf_counter()
    pruner.prune(config, calibration_dataset=batches, progress=False)
    seconds = time.perf_counter() - start
    rss = _vm_hwm_bytes()
    pruner.save_pretrained(args.out, overwrite=True)  # the repeats and the next setting reuse the folder
    print(json.dumps({"prune_s": seconds, "peak_rss_bytes": rss, "rss_before_bytes": before}))


if __name__ == "__main__":
    main()
