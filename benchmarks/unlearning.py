"""ModHiFi class unlearning on small classifiers trained here on scikit-learn's 8x8 digits (real, offline).

    python benchmarks/unlearning.py                                   # ResNet (zero), ViT and BERT (negate)
    python benchmarks/unlearning.py --models resnet --fractions 0.03 0.05 0.1

Each model is trained on 1,400 digits (a few seconds of CPU), then every class in turn is forgotten from a
fresh copy, with the paper's rule (HiFi sets on 64 forget-class samples only) and with ours (ranked by
selectivity against 256 samples of the other classes). Accuracy is measured on the 397 held-out digits:
forget = held-out accuracy on the forgotten class (chance is 10%), remain = on the other classes. BERT reads a
digit as a sequence of 64 tokens (pixel intensities 0-16). Prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_prune import ModHiFiConfig, Pruner  # noqa: E402
from hf_prune.engine.report import format_table  # noqa: E402


def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X = torch.tensor(X, dtype=torch.float32)[order].view(-1, 1, 8, 8) / 16.0 - 0.5
    y = torch.tensor(y)[order]
    return X[:1400], y[:1400], X[1400:], y[1400:]


def build(kind: str):
    import transformers as T

    torch.manual_seed(0)
    if kind == "resnet":
        model = T.ResNetForImageClassification(T.ResNetConfig(
            num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
            num_labels=10, downsample_in_first_stage=False))
        return model, (lambda x: {"pixel_values": x}), 300
    if kind == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32,
                                                        intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, num_labels=10))
        return model, (lambda x: {"pixel_values": x}), 400
    model = T.BertForSequenceClassification(T.BertConfig(vocab_size=20, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         max_position_embeddings=80, num_labels=10))
    return model, (lambda x: {"input_ids": ((x.flatten(1) + 0.5) * 16).round().long()}), 400


def train(model, inputs, X, y, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(y), (64,), generator=g)
        model(**inputs(X[idx]), labels=y[idx]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@torch.no_grad()
def accuracy(model, inputs, X, y, forget: int) -> tuple[float, float]:
    pred = model(**inputs(X)).logits.argmax(-1)
    keep = y != forget
    return float((pred[~keep] == forget).double().mean()), float((pred[keep] == y[keep]).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet", "vit", "bert"], choices=["resnet", "vit", "bert"])
    parser.add_argument("--fractions", nargs="+", type=float, default=None,
                        help="unlearn_fraction values (default: 0.05 0.1 for resnet, 0.1 0.2 for vit/bert)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    X, y, X_test, y_test = digits()
    for kind in args.models:
        model, inputs, steps = build(kind)
        start = time.perf_counter()
        train(model, inputs, X, y, steps)
        trained_s = time.perf_counter() - start
        dense = [accuracy(model, inputs, X_test, y_test, c) for c in range(10)]
        rows = [["dense", "-", "-", f"{100 * statistics.mean(f for f, _ in dense):.1f}",
                 f"{100 * max(f for f, _ in dense):.1f}", f"{100 * statistics.mean(r for _, r in dense):.1f}",
                 " ".join(f"{100 * f:.0f}" for f, _ in dense)]]
        for fraction in args.fractions or ([0.05, 0.1] if kind == "resnet" else [0.1, 0.2]):
            for rule in ("paper", "ours"):
                results, seconds, edit = [], [], ""
                for c in range(10):
                    copy_ = copy.deepcopy(model)
                    forget = [{**inputs(X[y == c][:64]), "labels": y[y == c][:64]}]
                    remain = [{**inputs(X[y != c][:256]), "labels": y[y != c][:256]}]
                    config = ModHiFiConfig(mode="unlearn", forget_data=forget, unlearn_fraction=fraction,
                                           remain_data=remain if rule == "ours" else None)
                    report = Pruner(copy_).prune(config, progress=False).report["unlearning"]
                    seconds.append(report["time_s"])
                    edit = report["edit"]
                    results.append(accuracy(copy_, inputs, X_test, y_test, c))
                rows.append([f"{rule} ({edit})", f"{fraction:g}", f"{statistics.mean(seconds):.2f}",
                             f"{100 * statistics.mean(f for f, _ in results):.1f}",
                             f"{100 * max(f for f, _ in results):.1f}",
                             f"{100 * statistics.mean(r for _, r in results):.1f}",
                             " ".join(f"{100 * f:.0f}" for f, _ in results)])
        print(f"\n## {kind}: {sum(p.numel() for p in model.parameters()):,} parameters, trained {steps} steps in "
              f"{trained_s:.1f}s; held-out accuracy (%) after forgetting each class in turn")
        print(format_table(rows, ["rule", "fraction", "unlearn s", "forget mean", "forget worst",
                                  "remain mean", "forget per class 0-9"]))


if __name__ == "__main__":
    main()
