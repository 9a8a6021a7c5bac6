"""Record the pruned weights and masks of the one-shot pruners, and compare two recordings with a float tolerance.

``behaviour_snapshot.py`` demands bit-equal tensors; a speed change that only reorders float arithmetic (a shared
Gram, another factorisation, an in-place update) cannot meet that. This tool keeps the tensors themselves and
checks what such a change must keep: every prune mask (the zeros of every pruned weight) identical, and every
weight equal up to ``max |a - b| / max |a| <= 1e-6`` per tensor.

Cases: Magnitude, Wanda, SparseGPT and RIA at unstructured 50%, 2:4 and 4:8, and ECoFLaP (zeroth order), on the
suite's tiny models and, when present, on the shared trained decoder (``../shared/models/pylm``).

    python tests/numeric_snapshot.py record /tmp/speed-ref/before      # on the commit before the change
    python tests/numeric_snapshot.py record /tmp/speed-ref/after       # after it
    python tests/numeric_snapshot.py compare /tmp/speed-ref/before /tmp/speed-ref/after
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's hf_prune, whatever is installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "models"))
PYLM = os.path.join(SHARED, "pylm")
PYLM_DATA = os.path.join(SHARED, "pylm-data")
TOLERANCE = 1e-6


def cases():
    from hf_prune import CalibrationConfig, ECoFLaPConfig, MagnitudeConfig, RIAConfig, SparseGPTConfig, WandaConfig

    cal = CalibrationConfig(num_samples=8)
    layerwise = (MagnitudeConfig, WandaConfig, SparseGPTConfig, RIAConfig)
    for family in ("llama", "opt", "bert", "vit", "clip", "blip2"):
        for cls in layerwise:
            for pattern in ("unstructured", "2:4", "4:8"):
                yield family, f"{cls.method}-{pattern}", lambda cls=cls, p=pattern: cls(pattern=p, calibration=cal)
    for family in ("llama", "bert"):
        yield family, "ecoflap-zo", lambda: ECoFLaPConfig(sparsity=0.5, num_score_samples=4, calibration=cal)
    if os.path.isdir(PYLM):
        pcal = CalibrationConfig(dataset=f"{PYLM_DATA}/calibration.txt", num_samples=16, seq_len=256, seed=0)
        for cls in layerwise:
            for pattern in ("unstructured", "2:4", "4:8"):
                yield "pylm", f"{cls.method}-{pattern}", lambda cls=cls, p=pattern: cls(pattern=p, calibration=pcal)
        yield "pylm", "ecoflap-zo", lambda: ECoFLaPConfig(sparsity=0.6, num_score_samples=8, calibration=pcal)


def _model(family, tokenizer):
    import torch
    from conftest import make_model

    from hf_prune import Pruner

    if family == "pylm":
        return Pruner.from_pretrained(PYLM, dtype=torch.float32)
    return Pruner(make_model(family, vocab=len(tokenizer)), tokenizer)


def record(folder: str) -> None:
    import torch
    from conftest import make_batches

    from hf_prune.calibration import builtin_texts
    from hf_prune.toy import train_tokenizer

    torch.set_num_threads(1)
    os.makedirs(folder, exist_ok=True)
    corpus = list(builtin_texts("builtin:python-docs", "train"))
    tokenizer = train_tokenizer(corpus[:2000])
    only = os.environ.get("SNAPSHOT_ONLY")  # a substring of the case keys to record, e.g. "pylm/" or "sparsegpt"
    for family, name, make_config in cases():
        key = f"{family}/{name}"
        if only and only not in key:
            continue
        pruner = _model(family, tokenizer)
        data = None if family == "pylm" else make_batches(family, tokenizer, corpus)
        torch.manual_seed(0)
        result = pruner.prune(make_config(), calibration_dataset=data, progress=False)
        pruned = set(result.report["sparsity"]["per_module"])
        tensors = {n: p.detach().cpu().clone() for n, p in pruner.model.named_parameters()
                   if n.rsplit(".", 1)[0] in pruned and n.endswith(".weight")}
        torch.save(tensors, os.path.join(folder, key.replace("/", "__") + ".pt"))
        print(key, len(tensors), "weights", flush=True)


def compare(before: str, after: str) -> int:
    import torch

    problems, count = [], 0
    for file in sorted(os.listdir(before)):
        if not os.path.exists(os.path.join(after, file)):
            continue
        a = torch.load(os.path.join(before, file))
        b = torch.load(os.path.join(after, file))
        worst = 0.0
        for name in sorted(set(a) | set(b)):
            if name not in a or name not in b:
                problems.append(f"{file}: {name} only in one recording")
                continue
            x, y = a[name].float(), b[name].float()
            flips = int(((x == 0) != (y == 0)).sum())
            if flips:
                problems.append(f"{file}: {name}: {flips} of {x.numel()} mask entries differ")
            rel = float((x - y).abs().max() / x.abs().max().clamp_min(1e-30))
            worst = max(worst, rel)
            if rel > TOLERANCE:
                problems.append(f"{file}: {name}: max relative difference {rel:.3g} > {TOLERANCE:g}")
        count += 1
        print(f"{file}: {len(a)} weights, worst relative difference {worst:.3g}")
    for line in problems[:100]:
        print(line)
    print(f"{count} cases compared; {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        print(__doc__)
        sys.exit(2)
