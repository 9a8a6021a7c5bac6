"""Record what every method x pattern does on the suite's tiny models, and compare two recordings.

A refactoring must not change behaviour. Run ``record`` on the commit before the change and on the one after,
then ``compare``: pruned tensors (sha256 of every state-dict entry), the pruning report (without wall times,
peak memory and the environment) and every saved file (sha256; the card and report as text with the volatile
numbers blanked) must be equal.

    python tests/behaviour_snapshot.py record /tmp/before.json
    python tests/behaviour_snapshot.py record /tmp/after.json
    python tests/behaviour_snapshot.py compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's hf_prune, whatever is installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOLATILE = ("run", "environment")
# card lines that carry wall time, memory or versions
VOLATILE_LINE = re.compile(r"(time|seconds|peak|MiB|GiB|version|torch|transformers|accelerate|peft|datasets|"
                           r"huggingface_hub|python|platform|Python)", re.I)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _tensor_hashes(model) -> dict:
    return {k: _sha(v.detach().cpu().contiguous().reshape(-1).view(-1).numpy().tobytes())
            for k, v in model.state_dict().items()}


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in VOLATILE and k != "hf_prune_version"}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 10)
    return obj


def _folder(path: str) -> dict:
    out = {}
    for root, _, files in os.walk(path):
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if name == "README.md":
                text = open(full, encoding="utf-8").read()
                out[rel] = [line for line in text.splitlines() if not VOLATILE_LINE.search(line)]
            elif name.endswith(".json") and name != "config.json":
                out[rel] = _clean(json.load(open(full, encoding="utf-8")))
            elif name.endswith(".png"):
                out[rel] = "png"  # matplotlib output carries its version and fonts
            else:
                out[rel] = _sha(open(full, "rb").read())
    return out


def cases():
    from hf_prune import (
        CalibrationConfig,
        ECoFLaPConfig,
        MagnitudeConfig,
        ModHiFiConfig,
        RIAConfig,
        SparseGPTConfig,
        SPPConfig,
        WandaConfig,
    )

    cal = CalibrationConfig(num_samples=8)
    families = ("llama", "opt", "bert", "vit", "clip", "blip2")
    for family in families:
        for cls in (MagnitudeConfig, WandaConfig, SparseGPTConfig, RIAConfig):
            for pattern in ("unstructured", "2:4", "4:8"):
                yield family, f"{cls.method}-{pattern}", lambda cls=cls, pattern=pattern: cls(pattern=pattern,
                                                                                             calibration=cal)
    for family in ("llama", "bert", "clip"):
        yield family, "ecoflap-zo", lambda: ECoFLaPConfig(sparsity=0.5, num_score_samples=4, calibration=cal)
        yield family, "ecoflap-fo", lambda: ECoFLaPConfig(sparsity=0.5, score="first_order", num_score_samples=4,
                                                          granularity="layer", calibration=cal)
    for family in ("llama", "opt"):
        yield family, "spp-training-free", lambda: SPPConfig(sparsity=0.5, training_free=True, calibration=cal)
    for family in ("llama", "bert", "vit"):
        yield family, "modhifi-fidelity", lambda: ModHiFiConfig(sparsity=0.25, calibration=cal)
        yield family, "modhifi-l2", lambda: ModHiFiConfig(sparsity=0.25, score="l2_norm", compensation="none",
                                                          calibration=cal)


def record(out_path: str) -> None:
    import torch
    from conftest import make_batches, make_model

    from hf_prune import Pruner
    from hf_prune.calibration import builtin_texts
    from hf_prune.toy import train_tokenizer

    torch.set_num_threads(1)
    corpus = list(builtin_texts("builtin:python-docs", "train"))
    tokenizer = train_tokenizer(corpus[:2000])
    results = {}
    for family, name, make_config in cases():
        key = f"{family}/{name}"
        model = make_model(family, vocab=len(tokenizer))
        batches = make_batches(family, tokenizer, corpus)
        pruner = Pruner(model, tokenizer)
        torch.manual_seed(0)
        try:
            result = pruner.prune(make_config(), calibration_dataset=batches, progress=False)
        except Exception as exc:  # a refusal is behaviour too
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(key, "error", exc, flush=True)
            continue
        entry = {"tensors": _tensor_hashes(pruner.model), "report": _clean(result.report)}
        with tempfile.TemporaryDirectory() as tmp:
            pruner.save_pretrained(os.path.join(tmp, "out"))
            entry["files"] = _folder(os.path.join(tmp, "out"))
        results[key] = entry
        print(key, "ok", flush=True)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1, sort_keys=True, default=str)


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{prefix}{k}: only in {'after' if k not in a else 'before'}")
            else:
                out += _diff(a[k], b[k], f"{prefix}{k}.")
        return out
    if a != b:
        return [f"{prefix[:-1]}: {str(a)[:200]!r} -> {str(b)[:200]!r}"]
    return []


def compare(before: str, after: str) -> int:
    a = json.load(open(before, encoding="utf-8"))
    b = json.load(open(after, encoding="utf-8"))
    diffs = _diff(a, b)
    for line in diffs[:200]:
        print(line)
    print(f"{len(a)} cases before, {len(b)} after; {len(diffs)} differences")
    return 1 if diffs else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        print(__doc__)
        sys.exit(2)
